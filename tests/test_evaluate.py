"""`--evaluate`: a predictions file scored again without a model, with the run's schema beside it or
without, and a broken line named."""

import json
import os
import shutil

from helpers import loads, read_jsonl, run_script


def edited_predictions(run, folder):
    """The demo's predictions, two of them spoilt, written to `folder`: (rows, path)."""
    rows = read_jsonl(os.path.join(run[0], "predictions.jsonl"))
    rows[1]["image_path"] = str(folder / "gone.jpg")  # a missing image becomes a placeholder
    rows[2]["prediction"] = rows[2]["prediction"][:40]  # cut off: invalid JSON
    rows[3]["prediction"] = json.dumps({**json.loads(rows[3]["prediction"]), "signature": "x"})  # JSON, off the schema
    path = folder / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows, path


def test_evaluate_rescores_a_predictions_file_without_a_model(run, tmp_path):
    """With the run's schema.json beside the file, schema_valid_rate is scored again too."""
    rows, path = edited_predictions(run, tmp_path)
    shutil.copy(os.path.join(run[0], "schema.json"), tmp_path / "schema.json")
    result = run_script("--evaluate", str(path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["rows"] == 24 and metrics["json_valid_rate"] == 23 / 24  # every other row was constrained
    assert metrics["schema_valid_rate"] == 22 / 24
    truths = [json.loads(row["suffix"]) for row in rows]
    assert metrics["exact_match"] == sum(loads(row["prediction"]) == t for row, t in zip(rows, truths)) / 24
    assert (tmp_path / "predictions.png").is_file() and (tmp_path / "report.html").is_file()
    assert "field (worst first)" in result.stdout and "model:" not in result.stdout


def test_evaluate_without_a_schema_beside_scores_no_schema_validity(run, tmp_path):
    from paligemma_json.evaluation import evaluate_file
    _, path = edited_predictions(run, tmp_path)
    metrics = evaluate_file(str(path))
    assert "schema_valid_rate" not in metrics and metrics["json_valid_rate"] == 23 / 24


def test_evaluate_names_a_broken_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"prediction": "{}", "suffix": "{}"}\n{"prediction": "{\n')
    result = run_script("--evaluate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {path} line 2: not valid JSON")
