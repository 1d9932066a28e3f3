"""Does calibrating the field confidence on the validation pass help? Temperature and Platt scaling,
fitted on the validation fields' scores (the logit of the confidence, clipped), scored on the test
fields: ECE (10 bins) and AUROC, raw against calibrated, per run.

    python benchmarks/calibration.py RUN_DIR [RUN_DIR ...] [--json OUT.json]

Each RUN_DIR is a finished run with `validation_predictions.jsonl` (written when the threshold is
picked on validation, CONFIDENCE_THRESHOLD = 0) and `predictions.jsonl`; a run that calibrated its
confidences keeps the raw ones (`raw_confidence`), which are used here. Fields are matched exactly
as `metrics.json` matches them (`paligemma_json.confidence.marked_fields`). The temperature is the
flow's own fit (`paligemma_json.confidence.fit_temperature`); Platt scaling adds a bias.

Both maps are monotone (an increasing function of the confidence, unless a fit comes out with a
negative slope, which the report would show), so neither can change AUROC, nor which fields a
threshold picked on validation flags: only what the number means (ECE).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paligemma_json.confidence import CLIP, VALIDATION_PREDICTIONS, calibrate, fit_temperature  # noqa: E402
from paligemma_json.json_text import jsonl_rows  # noqa: E402
from paligemma_json.confidence import confidence_auroc, confidence_ece, marked_fields  # noqa: E402
from paligemma_json.metrics import score_rows  # noqa: E402


def read_raw_rows(path: str) -> list[dict]:
    """The rows with their raw confidences: a run that calibrated keeps them as `raw_confidence`."""
    rows = [row for _, row in jsonl_rows(path, "rerun the predictions")]
    for row in rows:
        row["confidence"] = [{**field, "confidence": field.get("raw_confidence", field["confidence"])}
                             for field in row.get("confidence") or []]
    return rows


def scores(marked: list[tuple[float, bool]]) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.clip(np.array([c for c, _ in marked], dtype=np.float64), CLIP, 1 - CLIP)
    return np.log(confidence / (1 - confidence)), np.array([r for _, r in marked], dtype=np.float64)


def fit_logistic(z: np.ndarray, right: np.ndarray, with_bias: bool, steps: int = 100) -> np.ndarray:
    """Platt scaling: Newton's method on the log loss of sigmoid(a z + b) (without the bias, the
    temperature 1/a), from a=1, b=0 (the raw confidence); a tiny ridge keeps a separable split finite."""
    features = np.stack([z, np.ones_like(z)], axis=1) if with_bias else z[:, None]
    weights = np.zeros(features.shape[1])
    weights[0] = 1.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(features @ weights)))
        gradient = features.T @ (p - right) + 1e-6 * weights
        hessian = (features * (p * (1 - p))[:, None]).T @ features + 1e-6 * np.eye(len(weights))
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return weights


def apply(weights: np.ndarray, z: np.ndarray) -> np.ndarray:
    logits = weights[0] * z + (weights[1] if len(weights) > 1 else 0.0)
    return 1 / (1 + np.exp(-logits))


def measure(run_dir: str) -> dict:
    valid = marked_fields(score_rows(read_raw_rows(os.path.join(run_dir, VALIDATION_PREDICTIONS))))
    test = marked_fields(score_rows(read_raw_rows(os.path.join(run_dir, "predictions.jsonl"))))
    valid_z, valid_right = scores(valid)
    test_z, _ = scores(test)
    temperature = fit_temperature(valid)  # the flow's own fit and map (paligemma_json/confidence.py)
    platt = fit_logistic(valid_z, valid_right, with_bias=True)
    result = {"run": run_dir, "validation_fields": len(valid), "validation_wrong": int(len(valid) - valid_right.sum()),
              "test_fields": len(test), "test_wrong": sum(not right for _, right in test),
              "temperature": temperature, "platt_a": float(platt[0]), "platt_b": float(platt[1])}
    for name, confidences in [("raw", [c for c, _ in test]),
                              ("temperature", [calibrate(c, temperature) for c, _ in test]),
                              ("platt", apply(platt, test_z))]:
        calibrated = [(float(c), right) for c, (_, right) in zip(confidences, test)]
        result[f"ece_{name}"] = confidence_ece(calibrated)
        result[f"auroc_{name}"] = confidence_auroc(calibrated)
    return result


def verdict(results: list[dict]) -> str:
    lines = []
    for name in ("temperature", "platt"):
        better = all(r[f"ece_{name}"] < r["ece_raw"] for r in results)
        kept = all(r[f"auroc_{name}"] >= r["auroc_raw"] - 1e-12 for r in results)
        lines.append(f"{name}: ECE lower on {sum(r[f'ece_{name}'] < r['ece_raw'] for r in results)} of "
                     f"{len(results)} runs, AUROC {'never' if kept else 'sometimes'} lower -> "
                     f"{'improves' if better and kept else 'does not improve'} across runs")
    return "\n".join(lines)


def figure(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    results = [measure(run) for run in args.runs]
    print("| run | valid fields (wrong) | test fields (wrong) | T | Platt a, b | ECE raw | ECE temp | ECE Platt "
          "| AUROC raw | AUROC temp | AUROC Platt |")
    print("| --- |" + " --- |" * 10)
    for r in results:
        print(f"| {os.path.basename(os.path.normpath(r['run']))} | {r['validation_fields']} ({r['validation_wrong']}) "
              f"| {r['test_fields']} ({r['test_wrong']}) | {figure(r['temperature'])} | {r['platt_a']:.2f}, "
              f"{r['platt_b']:.2f} | " + " | ".join(figure(r[f"{kind}_{name}"]) for kind in ("ece", "auroc")
                                                    for name in ("raw", "temperature", "platt")) + " |")
    print(verdict(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
