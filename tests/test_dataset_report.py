"""The dataset report: leaks between splits, labels over the budget, fields and their fill rate."""

import json
import os
import shutil
import types

import pytest
from PIL import Image

import finetune_paligemma2 as flow
from paligemma_json.dataset_report import (build_dataset_report, dataset_warnings, field_paths, label_tokens,
                                            report_dataset, spread, token_budget)
from paligemma_json.schema import infer_schema


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    return flow.load_processor(demo_assets[1]).tokenizer


@pytest.fixture
def export(small_export, tmp_path):
    target = str(tmp_path / "export")
    shutil.copytree(small_export, target)
    return target


def splits_and_lengths(export, tokenizer):
    splits = flow.load_splits(export, "")
    return splits, label_tokens(splits, tokenizer)


def plant_reencoded_copy(export):
    """The first train photo, resized and saved at another JPEG quality, as a test row."""
    train_row = json.loads(open(os.path.join(export, "train", "annotations.jsonl")).readline())
    image = Image.open(os.path.join(export, "train", train_row["image"]))
    copy = image.resize((image.width * 2 // 3, image.height * 2 // 3)).convert("RGB")
    copy.save(os.path.join(export, "test", "IMG_9999_jpg.rf.copy.jpg"), quality=55)
    with open(os.path.join(export, "test", "annotations.jsonl"), "a") as annotations:
        annotations.write(json.dumps({**train_row, "image": "IMG_9999_jpg.rf.copy.jpg", "suffix": "{}"}) + "\n")
    return train_row["image"]


def test_a_clean_dataset_has_no_leaks(export, tokenizer):
    report = build_dataset_report(*splits_and_lengths(export, tokenizer), max_new_tokens=400)
    assert report["leaks"] == {"same_photo": [], "same_label": []}
    assert report["labels_over_budget"]["count"] == 0
    assert report["rows"] == {"train": 32, "valid": 8, "test": 8}
    assert dataset_warnings(report) == []


def test_a_reencoded_photo_in_two_splits_is_named_on_both_sides(export, tokenizer, tmp_path, capsys):
    original = plant_reencoded_copy(export)
    report = report_dataset(*splits_and_lengths(export, tokenizer), 400, str(tmp_path), strict=False)
    assert [(pair["train"], pair["test"]) for pair in report["leaks"]["same_photo"]] == \
        [(original, "IMG_9999_jpg.rf.copy.jpg")]
    printed = capsys.readouterr().out
    assert f"leak: the same photo in train/{original} and test/IMG_9999_jpg.rf.copy.jpg" in printed
    assert json.load(open(tmp_path / "dataset_report.json"))["leaks"] == report["leaks"]
    with pytest.raises(flow.FlowError, match="1 leaks between splits"):
        report_dataset(*splits_and_lengths(export, tokenizer), 400, str(tmp_path), strict=True)


def test_the_same_label_in_two_splits_is_a_leak(export, tokenizer):
    valid = os.path.join(export, "valid", "annotations.jsonl")
    train_label = json.loads(open(os.path.join(export, "train", "annotations.jsonl")).readline())["suffix"]
    rows = [json.loads(line) for line in open(valid)]
    rows[3]["suffix"] = train_label
    open(valid, "w").write("".join(json.dumps(row) + "\n" for row in rows))
    report = build_dataset_report(*splits_and_lengths(export, tokenizer), max_new_tokens=400)
    assert [pair["valid"] for pair in report["leaks"]["same_label"]] == [rows[3]["image"]]


def test_labels_over_the_budget_are_counted_with_the_longest(export, tokenizer):
    splits = flow.load_splits(export, "")
    by_split = {split: [len(tokenizer(e["suffix"])["input_ids"]) + 1 for e in data.entries]
                for split, data in splits.items()}
    lengths = sorted(n for split_lengths in by_split.values() for n in split_lengths)
    budget = lengths[-5]  # exactly four labels are longer
    report = build_dataset_report(splits, label_tokens(splits, tokenizer), max_new_tokens=budget)
    assert report["labels_over_budget"]["count"] == sum(n > budget for n in lengths) == 4
    assert report["labels_over_budget"]["longest"] == lengths[-1]
    assert "4 labels are longer than MAX_NEW_TOKENS" in dataset_warnings(report)[0]
    assert report["label_tokens"] == {split: spread(n) for split, n in by_split.items()}  # each split its own


def test_field_paths_fill_rates_and_types():
    found = field_paths({"a": "x", "b": "", "n": 0, "items": [{"c": 1}, {"c": "2"}], "empty": [], "o": {"d": None}})
    assert found == {"a": (True, {"string"}), "b": (False, {"string"}), "n": (True, {"integer"}),
                     "items.c": (True, {"integer", "string"}), "empty": (False, {"array"}), "o.d": (False, {"null"})}


def test_the_report_types_whole_numbers_integer_as_the_schema_does(export, tokenizer):
    """One rule for JSON types: the dataset report and the schema both call 3 an integer."""
    train = os.path.join(export, "train", "annotations.jsonl")
    rows = [json.loads(line) for line in open(train)]
    labels = [{"count": n, "weight": n + 0.5, "sealed": n % 2 == 0, "tags": [n]} for n in range(len(rows))]
    open(train, "w").write("".join(json.dumps({**row, "suffix": json.dumps(label)}) + "\n"
                                   for row, label in zip(rows, labels)))
    fields = build_dataset_report(*splits_and_lengths(export, tokenizer), max_new_tokens=400)["fields"]
    assert {name: fields[name]["types"] for name in ("count", "weight", "sealed", "tags")} == {
        "count": ["integer"], "weight": ["number"], "sealed": ["boolean"], "tags": ["array"]}
    schema = infer_schema(labels)["properties"]
    assert [schema[name]["type"] for name in ("count", "weight", "sealed")] == ["integer", "number", "boolean"]


def test_the_token_budget_is_the_longest_label_with_eos_plus_a_quarter_or_16():
    def characters(text):  # one token per character, so lengths are plain to read
        return {"input_ids": list(text)}

    def split(*lengths):
        return types.SimpleNamespace(entries=[{"suffix": "x" * n} for n in lengths])

    def budget(*splits):
        lengths = label_tokens(dict(enumerate(splits)), characters)
        return token_budget([n for split_lengths in lengths.values() for n in split_lengths])
    assert label_tokens({"train": split(10, 30), "valid": split(5)}, characters) == {"train": [11, 31], "valid": [6]}
    assert budget(split(10, 30), split(5)) == 31 + 16  # short labels: at least 16 spare
    assert budget(split(10), split(199, 40)) == 200 + 50  # long ones: a quarter more
    assert budget(split(99)) == 100 + 25




def test_the_report_reads_each_label_and_image_header_from_the_load(export, tokenizer, monkeypatch):
    """Labels are parsed and image headers read once, when the splits load (documents.Entry); the
    report opens each image only for its perceptual hash, which needs the pixels."""
    splits, lengths = splits_and_lengths(export, tokenizer)
    suffixes = {entry["suffix"] for data in splits.values() for entry in data.entries}
    parsed, opened, loads, open_image = [], [], json.loads, Image.open

    def counted_loads(text, *args, **kwargs):
        if text in suffixes:
            parsed.append(text)
        return loads(text, *args, **kwargs)

    def counted_open(path, *args, **kwargs):
        opened.append(path)
        return open_image(path, *args, **kwargs)
    monkeypatch.setattr(json, "loads", counted_loads)
    monkeypatch.setattr(Image, "open", counted_open)
    report = build_dataset_report(splits, lengths, max_new_tokens=400)
    assert parsed == [] and len(opened) == sum(len(data) for data in splits.values()) == 48
    monkeypatch.undo()
    for split, data in splits.items():  # the sizes the load's check kept are the files' own
        widths = [Image.open(os.path.join(export, split, entry["image"])).width for entry in data.entries]
        assert report["images"][split]["width"] == spread(widths)
