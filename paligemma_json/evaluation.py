"""Step 9 of the flow, and `--evaluate`: score prediction rows, write `metrics.json` and the
pictures beside them, print the table. Needs no model and no GPU."""

import os

from paligemma_json import FlowError
from paligemma_json.confidence import threshold_for
from paligemma_json.files import write_json_atomically
from paligemma_json.json_text import jsonl_rows
from paligemma_json.confidence import FALLBACK_THRESHOLD
from paligemma_json.metrics import format_metrics_table, metrics_of, score_rows
from paligemma_json.html_report import write_html_report
from paligemma_json.pictures import draw_predictions
from paligemma_json.schema import read_saved_schema


def read_predictions(path: str) -> list[dict]:
    """Rows of a `predictions.jsonl`; each needs a string `prediction` and `suffix`."""
    if not os.path.isfile(path):
        raise FlowError(f"{path}: no such predictions file; pass the predictions.jsonl of a finished run")
    rows = []
    for where, row in jsonl_rows(path, "was the file cut off? Remove the line, or rerun the predictions"):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prediction", "suffix")):
            raise FlowError(f"{where}: a row needs string 'prediction' and 'suffix'")
        rows.append(row)
    if not rows:
        raise FlowError(f"{path}: no rows to score")
    return rows


def evaluate_predictions(rows: list[dict], output_dir: str, schema: dict | None = None,
                         threshold: float = FALLBACK_THRESHOLD, threshold_source: str = "given") -> dict:
    """`metrics.json`, `predictions.png` and `report.html` in `output_dir`, each written whole or
    not at all. Fields below the confidence `threshold` are flagged. Each row is scored once, for all three."""
    scored = score_rows(rows)
    metrics = metrics_of(scored, schema, threshold, threshold_source)
    written = [os.path.join(output_dir, name) for name in ("metrics.json", "predictions.png", "report.html")]
    write_json_atomically(metrics, written[0])
    draw_predictions(scored, written[1], threshold=threshold)
    write_html_report(scored, metrics, written[2])
    print(format_metrics_table(metrics))
    print("written: " + ", ".join(written))
    return metrics


def evaluate_file(path: str, threshold: float = 0.0) -> dict:
    """Scores a predictions file again, with the run's `schema.json` beside it when there is one.
    `threshold` 0: the one saved beside it (`confidence.json`, else the run's `final/confidence.json`)."""
    output_dir = os.path.dirname(os.path.abspath(path))
    schema = read_saved_schema(output_dir)
    rows = read_predictions(path)
    chosen = threshold_for(threshold, [output_dir, os.path.join(output_dir, "final")])
    return evaluate_predictions(rows, output_dir, schema, chosen["threshold"], chosen["source"])
