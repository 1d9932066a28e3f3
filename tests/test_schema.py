"""The labels' JSON Schema: inferred on edge cases, a user's own checked, and schema_valid_rate."""

import json
import os

import pytest
from jsonschema import Draft202012Validator

import finetune_paligemma2 as flow
from paligemma_json.json_text import parse_json
from paligemma_json.metrics import compute_metrics
from paligemma_json.schema import infer_schema, load_schema, schema_from_labels


def test_optional_keys_nested_lists_and_first_seen_order():
    labels = [{"b": "x", "a": 1, "items": [{"n": "p", "q": 2}, {"n": "qq"}]},
              {"a": 2, "c": True, "items": []}]
    schema = infer_schema(labels)
    Draft202012Validator.check_schema(schema)
    assert list(schema["properties"]) == ["b", "a", "items", "c"]
    assert schema["required"] == ["a", "items"] and schema["additionalProperties"] is False
    items = schema["properties"]["items"]
    assert items["type"] == "array" and items["maxItems"] == 4  # longest 2, plus a margin of 2
    assert items["items"]["required"] == ["n"] and items["items"]["properties"]["q"] == {
        "type": "integer", "minimum": 0, "maximum": 99}  # one digit more than the largest seen
    assert schema["properties"]["b"] == {"type": "string", "maxLength": 3}
    assert all(Draft202012Validator(schema).is_valid(label) for label in labels)
    assert not Draft202012Validator(schema).is_valid({**labels[0], "extra": 1})  # no unknown keys
    assert not Draft202012Validator(schema).is_valid({**labels[0], "b": "x" * 40})  # strings are bounded


def test_a_value_somewhat_longer_than_any_seen_is_allowed_and_far_longer_is_not():
    """Real documents outgrow the training labels a little: 40% longer is past the margin's floor
    of 2 characters or items, and still fits; ten times longer does not."""
    labels = [{"name": "x" * 20, "items": [1] * 10}, {"name": "short", "items": [1]}]
    validator = Draft202012Validator(infer_schema(labels))
    assert validator.is_valid({"name": "y" * 28, "items": [2] * 14})
    assert not validator.is_valid({"name": "y" * 200, "items": [2]})
    assert not validator.is_valid({"name": "y", "items": [2] * 100})


def test_numbers_vs_strings_empty_lists_and_a_single_row():
    schema = infer_schema([{"n": 3, "m": "3", "e": []}, {"n": 2.5, "m": 4, "e": []}])
    assert schema["properties"]["n"] == {"type": "number", "minimum": 0, "maximum": 99}
    assert schema["properties"]["m"] == {"type": ["integer", "string"], "maxLength": 3, "minimum": 0, "maximum": 99}
    negative = infer_schema([{"t": -120}, {"t": 7}])["properties"]["t"]
    assert negative == {"type": "integer", "minimum": -9999, "maximum": 9999}
    assert schema["properties"]["e"] == {"type": "array", "maxItems": 2}
    single = infer_schema([{"only": "row"}])
    assert single["required"] == ["only"] and Draft202012Validator(single).is_valid({"only": "row"})


def test_labels_that_are_not_json_switch_the_schema_off(capsys):
    assert schema_from_labels([parse_json('{"a": 1}'), parse_json("a caption")]) is None
    assert "1 train/valid labels are not JSON" in capsys.readouterr().out


def test_a_users_schema_is_checked(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"type": "object", "required": ["a"]}))
    bad.write_text(json.dumps({"type": "objekt"}))
    assert load_schema(str(good)) == {"type": "object", "required": ["a"]}
    with pytest.raises(flow.FlowError, match="bad.json: not a usable JSON Schema"):
        load_schema(str(bad))
    with pytest.raises(flow.FlowError, match="missing.json: not a usable JSON Schema"):
        load_schema(str(tmp_path / "missing.json"))


def test_schema_valid_rate_counts_only_valid_json_that_fits():
    schema = infer_schema([{"a": "x", "n": 1}])
    rows = [{"prediction": '{"a": "y", "n": 2}', "suffix": '{"a": "x", "n": 1}'},   # fits, though wrong
            {"prediction": '{"a": "y", "n": "2"}', "suffix": '{"a": "x", "n": 1}'},  # a string for a number
            {"prediction": '{"a": "y"', "suffix": '{"a": "x", "n": 1}'}]              # not JSON
    assert compute_metrics(rows, schema)["schema_valid_rate"] == pytest.approx(1 / 3)
    assert "schema_valid_rate" not in compute_metrics(rows)


def test_the_demo_saves_the_schema_its_labels_fit(demo_run):
    output_dir = demo_run[0]
    schema = json.load(open(os.path.join(output_dir, "schema.json")))
    assert json.load(open(os.path.join(output_dir, "final", "schema.json"))) == schema
    validator = Draft202012Validator(schema)
    for split in ("train", "valid"):
        for line in open(os.path.join(output_dir, "demo-dataset", split, "annotations.jsonl")):
            assert validator.is_valid(json.loads(json.loads(line)["suffix"]))
    metrics = json.load(open(os.path.join(output_dir, "metrics.json")))
    assert 0.8 <= metrics["schema_valid_rate"] <= metrics["json_valid_rate"]
