"""JSONLDataset and the split loader: the export as Roboflow writes it, and each kind of broken input."""

import json
import os
import shutil

import pytest
from PIL import Image

import finetune_paligemma2 as flow
from paligemma_json.dataset_report import build_dataset_report, label_tokens
from paligemma_json.schema import check_json_labels, count_non_json_labels
from helpers import run_flow, run_script


def rewrite_line(path, number, text):
    lines = open(path).read().splitlines()
    lines[number - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


def first_row(path):
    return json.loads(open(path).readline())


def test_roboflow_layout_loads_as_three_splits(demo_assets):
    splits = flow.load_splits(demo_assets[0], prompt="")
    assert [len(splits[s]) for s in flow.SPLITS] == [150, 16, 24]
    image, entry = splits["test"][0]
    assert image.mode == "RGB"
    assert set(entry) >= {"image", "prefix", "suffix"} and entry["prefix"] == "<JSON>"
    assert entry["image"].startswith("IMG_") and ".rf." in entry["image"]
    with pytest.raises(IndexError):
        splits["test"][len(splits["test"])]


def test_prompt_replaces_the_placeholder_prefix(demo_assets):
    train = flow.JSONLDataset(os.path.join(demo_assets[0], "train", "annotations.jsonl"),
                              os.path.join(demo_assets[0], "train"), prompt="extract data in JSON format")
    assert {entry["prefix"] for entry in train.entries} == {"extract data in JSON format"}


def test_grayscale_images_come_out_rgb(export):
    folder = os.path.join(export, "valid")
    name = first_row(os.path.join(folder, "annotations.jsonl"))["image"]
    Image.open(os.path.join(folder, name)).convert("L").save(os.path.join(folder, name))
    image, _ = flow.JSONLDataset(os.path.join(folder, "annotations.jsonl"), folder)[0]
    assert image.mode == "RGB"


@pytest.mark.parametrize("text, expected", [
    pytest.param('{"image": "a.jpg", "prefix": ', "line 2: not valid JSON", id="not JSON"),
    pytest.param('["a.jpg", "<JSON>", "{}"]', "line 2: expected an object", id="not an object"),
    pytest.param('{"image": "IMAGE", "prefix": "<JSON>"}', "line 2: 'suffix' is missing", id="missing suffix"),
    pytest.param('{"image": "IMAGE", "prefix": 3, "suffix": "{}"}', "line 2: 'prefix' is not a string (int)",
                 id="number prefix"),
    pytest.param('{"image": "nope.jpg", "prefix": "<JSON>", "suffix": "{}"}', "line 2: image", id="missing image"),
])
def test_each_bad_row_names_file_and_line(export, text, expected):
    annotations = os.path.join(export, "train", "annotations.jsonl")
    rewrite_line(annotations, 2, text.replace("IMAGE", first_row(annotations)["image"]))
    with pytest.raises(flow.FlowError) as error:
        flow.load_splits(export, prompt="")
    assert annotations in str(error.value) and expected in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage, expected", [
    ("empty", "is empty"),
    ("truncated", "cannot be read"),
    ("not an image", "cannot be read"),
])
def test_each_bad_image_names_the_image_and_line(export, damage, expected):
    annotations = os.path.join(export, "test", "annotations.jsonl")
    path = os.path.join(export, "test", first_row(annotations)["image"])
    data = open(path, "rb").read()
    open(path, "wb").write({"empty": b"", "truncated": data[: len(data) // 2],
                            "not an image": b"these are not pixels"}[damage])
    with pytest.raises(flow.FlowError) as error:
        flow.load_splits(export, prompt="")
    assert f"{annotations} line 1: image {path}" in str(error.value) and expected in str(error.value)


def test_missing_split_is_named(export):
    shutil.rmtree(os.path.join(export, "valid"))
    with pytest.raises(flow.FlowError, match="split 'valid' is missing"):
        flow.load_splits(export, prompt="")


def test_split_without_annotations_is_named(export):
    os.remove(os.path.join(export, "test", "annotations.jsonl"))
    with pytest.raises(flow.FlowError, match=r"test.annotations\.jsonl: missing"):
        flow.load_splits(export, prompt="")


def test_empty_split_is_named(export):
    open(os.path.join(export, "valid", "annotations.jsonl"), "w").write("\n")
    with pytest.raises(flow.FlowError, match=r"valid.annotations\.jsonl: no rows"):
        flow.load_splits(export, prompt="")


def break_two_labels(export) -> tuple[str, str]:
    """valid's line 1 a caption, test's line 3 a JSON string: two broken labels among 190 JSON ones."""
    valid, test = (os.path.join(export, split, "annotations.jsonl") for split in ("valid", "test"))
    rewrite_line(valid, 1, json.dumps({**first_row(valid), "suffix": "a caption, not JSON"}))
    row = json.loads(open(test).read().splitlines()[2])
    rewrite_line(test, 3, json.dumps({**row, "suffix": '"7"'}))
    return valid, test


def test_a_label_that_is_not_json_among_json_ones_stops_the_run_naming_each(export, tmp_path, monkeypatch):
    """Through the flow, at step 3, before any model loads (the model path does not exist)."""
    valid, test = break_two_labels(export)
    with pytest.raises(flow.FlowError) as stopped:
        run_flow(monkeypatch, "--dataset-dir", export, "--model-id", str(tmp_path / "no-model"),
                 "--output-dir", str(tmp_path / "out"))
    assert str(stopped.value) == (
        f"{valid} line 1: the label is not valid JSON (expecting value at column 1), while 188 of 190 labels are "
        f"JSON; also {test} line 3; fix the label (or set SKIP_NON_JSON_LABELS, --skip-non-json-labels, to leave "
        "such rows out)")


def test_a_setting_leaves_such_rows_out_named_and_counted(export, processor, capsys):
    valid, test = break_two_labels(export)
    splits = flow.load_splits(export, prompt="")
    left_out = check_json_labels(splits, skip=True)
    assert left_out == [f"{valid} line 1: the label is not valid JSON (expecting value at column 1)",
                        f"{test} line 3: the label is a JSON string, not an object or array"]
    assert [len(splits[split]) for split in flow.SPLITS] == [150, 15, 23]
    assert all(entry.label is not None for data in splits.values() for entry in data.entries)
    printed = capsys.readouterr().out
    assert f"left out: {left_out[1]}" in printed and "labels: 2 rows whose label is not JSON left out" in printed
    report = build_dataset_report(splits, label_tokens(splits, processor.tokenizer), max_new_tokens=400)
    assert report["labels_left_out"] == {"train": [], "valid": left_out[:1], "test": left_out[1:]}
    assert report["json_rows"] == 188


def test_labels_mostly_not_json_train_as_they_are(export, capsys):
    for split in flow.SPLITS:
        path = os.path.join(export, split, "annotations.jsonl")
        rows = [json.loads(line) for line in open(path)]
        open(path, "w").writelines(json.dumps({**row, "suffix": "a caption"} if index % 2 else row) + "\n"
                                   for index, row in enumerate(rows))
    splits = flow.load_splits(export, prompt="")
    assert check_json_labels(splits, skip=False) == []  # exactly half are captions: not "more than half JSON"
    assert count_non_json_labels(splits["train"]) == 75
    assert "warning: 95 labels are not JSON" in capsys.readouterr().out


def test_broken_dataset_stops_the_script_in_one_line(export, tmp_path):
    """Exit code, one line, no traceback, no model loaded (the model path does not exist), and no
    empty OUTPUT_DIR left behind: step 1 created it and the folder above it, and nothing was written."""
    annotations = os.path.join(export, "train", "annotations.jsonl")
    rewrite_line(annotations, 3, "{broken")
    result = run_script("--dataset-dir", export, "--model-id", str(tmp_path / "no-model"),
                        "--output-dir", str(tmp_path / "runs" / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {annotations} line 3: not valid JSON (expecting property name " \
                                    "enclosed in double quotes at column 2); fix or remove the line"
    assert "model:" not in result.stdout
    assert not (tmp_path / "runs").exists()


def test_a_stopped_run_keeps_an_output_dir_that_was_there(export, tmp_path):
    """Only a folder the run itself created is removed: the user's own, even empty, stays."""
    output_dir = tmp_path / "mine"
    output_dir.mkdir()
    rewrite_line(os.path.join(export, "train", "annotations.jsonl"), 3, "{broken")
    result = run_script("--dataset-dir", export, "--model-id", str(tmp_path / "no-model"),
                        "--output-dir", str(output_dir))
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert output_dir.is_dir()


def test_a_file_that_is_not_utf8_is_named(export):
    annotations = os.path.join(export, "train", "annotations.jsonl")
    lines = open(annotations, "rb").read().splitlines(keepends=True)
    lines[4] = b'{"image": "caf\xe9.jpg"}\n'  # Latin-1
    open(annotations, "wb").write(b"".join(lines))
    with pytest.raises(flow.FlowError, match=r"annotations\.jsonl line 5: not UTF-8 text; save the file as UTF-8"):
        flow.load_splits(export, prompt="")
