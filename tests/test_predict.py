"""`--predict`: a folder or one image read with the final model, held to its schema unless told not to,
and each way it can be pointed wrong named in one line."""

import json
import os
import shutil

import pytest
import torch

import finetune_paligemma2 as flow
from helpers import read_jsonl, run_script
from paligemma_json.confidence import calibrate
from paligemma_json.json_text import parse_json
from paligemma_json.schema import with_layout


def test_predict_reads_a_folder_or_one_image_with_the_final_model(demo_run):
    output_dir = demo_run[0]
    folder = os.path.join(output_dir, "demo-dataset", "test")
    result = run_script("--output-dir", output_dir, "--predict", folder)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "predict.jsonl"))]
    images = sorted(name for name in os.listdir(folder) if name.endswith(".jpg"))
    assert [row["image"] for row in rows] == images
    assert set(rows[0]) == {"image", "image_path", "prefix", "prediction", "truncated", "confidence", "parsed",
                            "held_out"}
    assert [row["held_out"] for row in rows] == [f"test's {image}" for image in images]  # the run's own test photos
    assert all(0 <= field["confidence"] <= 1 for row in rows for field in row["confidence"])
    assert sum(len(row["confidence"]) for row in rows) >= 24 * 10  # a confidence for every field
    assert sum(row["parsed"] for row in rows) >= 0.8 * len(rows)
    assert all(row["parsed"] == (parse_json(row["prediction"]) is not None) for row in rows)
    assert f"predicted: 24 images, {sum(row['parsed'] for row in rows)} parsed as JSON" in result.stdout
    # The threshold picked on validation and saved with the model (tests/test_confidence.py), not 0.8.
    chosen = json.load(open(os.path.join(output_dir, "final", "confidence.json")))
    assert f"confidence threshold: {chosen['threshold']:.4g} (validation), from {output_dir}" in result.stdout
    unsure = sum(field["confidence"] < chosen["threshold"] for row in rows for field in row["confidence"])
    assert f"{unsure} fields below confidence {chosen['threshold']:.4g} to check" in result.stdout
    assert all(field["confidence"] == calibrate(field["raw_confidence"], chosen["temperature"])
               for row in rows for field in row["confidence"])  # as the test set was calibrated
    assert not os.path.exists(os.path.join(output_dir, "predict.jsonl.tmp"))

    one = run_script("--output-dir", output_dir, "--predict", os.path.join(folder, images[3]))
    assert one.returncode == 0 and "replaced" in one.stdout
    only = [json.loads(line) for line in open(os.path.join(output_dir, "predict.jsonl"))]
    assert len(only) == 1 and only[0]["prediction"] == rows[3]["prediction"]  # batched equals alone


@pytest.mark.parametrize("target, message", [("missing.jpg", "no such image or folder"), ("", "no images")])
def test_predict_names_what_is_wrong(demo_run, tmp_path, target, message):
    (tmp_path / "empty").mkdir()
    path = str(tmp_path / "empty" / target) if target else str(tmp_path / "empty")
    result = run_script("--output-dir", demo_run[0], "--predict", path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_predict_without_a_trained_model_is_one_line(tmp_path, demo_assets):
    result = run_script("--output-dir", str(tmp_path / "nothing"), "--predict", demo_assets[0])
    assert result.returncode == 2 and "no trained model; point --output-dir at a finished run" in result.stderr


def test_predict_no_constrained_decodes_free(demo_assets, tmp_path, capsys):
    """The untrained tiny model writes `<locNNNN>` tokens left to itself and a small object when
    held to final/schema.json: which of the two `--predict` wrote shows whether it was constrained."""
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    schema = with_layout({"type": "object", "properties": {"route": {"type": "string", "maxLength": 4}},
                               "required": ["route"], "additionalProperties": False}, ['{"route": "R12"}'])
    flow.save_final_model(model, flow.load_processor(demo_assets[1]), str(tmp_path / "final"), schema)
    source, images = os.path.join(demo_assets[0], "test"), tmp_path / "images"
    names = sorted(name for name in os.listdir(source) if name.endswith(".jpg"))[:3]
    images.mkdir()
    for name in names:
        shutil.copy(os.path.join(source, name), images)
    images = str(images)

    def predict(constrained):
        rows = read_jsonl(flow.predict_documents(str(tmp_path), images, "extract data in JSON format",
                                                 flow.GenerationSettings(torch.float32, 30, batch_size=3),
                                                 constrained=constrained, threshold=0.8))
        return rows, capsys.readouterr().out
    held, printed = predict(True)
    assert "decoding: constrained" in printed and all(row["parsed"] for row in held)
    free, printed = predict(False)
    assert "decoding: free (--no-constrained)" in printed
    assert [row["image"] for row in free] == names and not any(row["parsed"] for row in free)
