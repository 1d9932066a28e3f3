"""Step 8 of the flow, and `--evaluate`: score prediction rows, write `metrics.json` and the
pictures beside them, print the table. Needs no model and no GPU."""

import json
import os

from paligemma_json import FlowError
from paligemma_json.confidence import threshold_for
from paligemma_json.files import write_json_atomically
from paligemma_json.metrics import compute_metrics, format_metrics_table
from paligemma_json.html_report import write_html_report
from paligemma_json.pictures import draw_predictions
from paligemma_json.schema import load_schema


def read_predictions(path: str) -> list[dict]:
    """Rows of a `predictions.jsonl`; each needs a string `prediction` and `suffix`."""
    if not os.path.isfile(path):
        raise FlowError(f"{path}: no such predictions file; pass the predictions.jsonl of a finished run")
    rows = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                row = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise FlowError(f"{path} line {number}: not a JSON line; was the file cut off? "
                                "Remove the line, or rerun the predictions") from None
            if row is None:
                continue
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prediction", "suffix")):
                raise FlowError(f"{path} line {number}: a row needs string 'prediction' and 'suffix'")
            rows.append(row)
    if not rows:
        raise FlowError(f"{path}: no rows to score")
    return rows


def evaluate_predictions(rows: list[dict], output_dir: str, schema: dict | None = None,
                         threshold: float = 0.8, threshold_source: str = "given") -> dict:
    """`metrics.json`, `predictions.png` and `report.html` in `output_dir`, each written whole or
    not at all. Fields below the confidence `threshold` are flagged."""
    metrics = compute_metrics(rows, schema, threshold, threshold_source)
    written = [os.path.join(output_dir, name) for name in ("metrics.json", "predictions.png", "report.html")]
    write_json_atomically(metrics, written[0])
    draw_predictions(rows, written[1], threshold=threshold)
    write_html_report(rows, metrics, written[2])
    print(format_metrics_table(metrics))
    print("written: " + ", ".join(written))
    return metrics


def evaluate_file(path: str, threshold: float = 0.0) -> dict:
    """Scores a predictions file again, with the run's `schema.json` beside it when there is one.
    `threshold` 0: the one saved beside it (`confidence.json`, else the run's `final/confidence.json`)."""
    output_dir = os.path.dirname(os.path.abspath(path))
    schema_path = os.path.join(output_dir, "schema.json")
    schema = load_schema(schema_path) if os.path.isfile(schema_path) else None
    rows = read_predictions(path)
    chosen = threshold_for(threshold, [output_dir, os.path.join(output_dir, "final")])
    return evaluate_predictions(rows, output_dir, schema, chosen["threshold"], chosen["source"])
