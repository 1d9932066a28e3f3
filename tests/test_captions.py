"""Labels that are not JSON (captions), end to end: the flow trains and predicts with free decoding,
saves no schema, and the JSON metrics leave those rows out; `--predict` on such a run decodes free."""

import json
import os
import shutil

import pytest
import torch

import finetune_paligemma2 as flow
from helpers import read_jsonl, run_flow, short_run_args
from paligemma_json.json_text import parse_json
from paligemma_json.metrics import compute_metrics

PROMPT = "extract data in JSON format"


def caption(suffix):
    manifest = json.loads(suffix)
    return f"a pallet load manifest for route {manifest['route']}, {manifest['total_cases']} cases"


@pytest.fixture(scope="module")
def caption_export(small_export, tmp_path_factory):
    """The small export with every other label a caption instead of JSON."""
    target = tmp_path_factory.mktemp("captions") / "export"
    shutil.copytree(small_export, target)
    for split in ("train", "valid", "test"):
        path = target / split / "annotations.jsonl"
        rows = [json.loads(line) for line in open(path)]
        rows = [{**row, "suffix": caption(row["suffix"])} if index % 2 else row for index, row in enumerate(rows)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(target)


def test_caption_labels_run_free_and_the_json_metrics_leave_them_out(caption_export, demo_run, tmp_path, monkeypatch,
                                                                     capsys):
    # The demo's trained model as the base, barely moved: its predictions are manifests, so a caption
    # row counted as a JSON row would change the figures below.
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "schema.json").write_text('{"type": "object"}')  # an earlier run's, cut off before training
    run_flow(monkeypatch, *short_run_args(caption_export, os.path.join(demo_run[0], "final"), output_dir,
                                          "--learning-rate", "1e-6", "--max-steps", "4", "--save-steps", "4",
                                          "--max-new-tokens", "400", "--no-dataset-report"))
    printed = capsys.readouterr().out
    assert "warning: 24 labels are not JSON" in printed and "20 train/valid labels are not JSON: no schema" in printed
    assert "decoding: free, no schema" in printed  # CONSTRAINED is on, but there is no structure to hold
    assert "effective batch: 4 (BATCH_SIZE 4 x GRAD_ACCUM 1 x 1 process)" in printed
    # No schema: not the earlier run's either, which --evaluate would score these predictions against.
    assert not (output_dir / "schema.json").exists() and not (output_dir / "final" / "schema.json").exists()

    rows = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    assert len(rows) == 8 and not any("free_prediction" in row for row in rows)
    metrics = json.load(open(output_dir / "metrics.json"))
    assert metrics["decoding"] == "free" and metrics["rows"] == 8 and metrics["rows_without_json_target"] == 4
    assert "schema_valid_rate" not in metrics and not [name for name in metrics if name.startswith("free_")]
    json_rows = rows[0::2]  # the rows whose label is JSON
    assert all(parse_json(row["suffix"]) is None for row in rows[1::2])
    assert sum(parse_json(row["prediction"]) is not None for row in json_rows) >= 3  # the model writes manifests
    assert metrics["json_valid_rate"] == sum(parse_json(row["prediction"]) is not None
                                             for row in json_rows) / len(json_rows)
    alone = compute_metrics(json_rows)
    for name in ("field_precision", "field_recall", "field_f1", "ted_accuracy", "exact_match", "per_field"):
        assert metrics[name] == alone[name], name  # the caption rows change none of them

    # --predict with this run's final/, which has no schema.json: free decoding, not an error
    images = os.path.join(caption_export, "test")
    predicted = read_jsonl(flow.predict_documents(str(output_dir), images, PROMPT,
                                                  flow.GenerationSettings(torch.float32, 400), threshold=0.8))
    assert "decoding: free, no schema" in capsys.readouterr().out
    assert [row["image"] for row in predicted] == sorted(row["image"] for row in rows)
    by_image = {row["image"]: row["prediction"] for row in rows}
    assert [row["prediction"] for row in predicted] == [by_image[row["image"]] for row in predicted]
