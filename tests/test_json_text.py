"""The JSON text rules every module shares: key paths, JSON types, and reading a JSON Lines file."""

import json

import pytest

from paligemma_json import FlowError
from paligemma_json.confidence import leaf_spans
from paligemma_json.json_text import json_type, jsonl_rows, key_paths

DOCUMENT = {"route": "R1", "products": [{"cases": 4, "tags": ["a", "b"]}, {"cases": 12, "info": {"ok": True}}],
            "empty": {}, "none": [], "note": None}


def test_key_paths_name_nested_keys_with_dots_and_share_a_list_items_path():
    assert list(key_paths(DOCUMENT)) == [
        ("route", "R1"), ("products.cases", 4), ("products.tags", "a"), ("products.tags", "b"),
        ("products.cases", 12), ("products.info.ok", True), ("note", None)]


def test_the_constraint_finds_the_same_key_paths_in_the_text():
    text = json.dumps(DOCUMENT)
    assert [(path, value) for path, value, *_ in leaf_spans(text)] == list(key_paths(DOCUMENT))


@pytest.mark.parametrize("value, expected", [(3, "integer"), (0, "integer"), (2.5, "number"), (3.0, "number"),
                                             (True, "boolean"), (False, "boolean"), ("3", "string"),
                                             (None, "null"), ([], "array"), ({}, "object")])
def test_json_type_says_integer_for_whole_numbers_and_boolean_for_true(value, expected):
    assert json_type(value) == expected


def write_lines(tmp_path, *lines: bytes):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(lines))
    return str(path)


def test_jsonl_rows_skip_blank_lines_and_name_each_line(tmp_path):
    path = write_lines(tmp_path, b'{"a": 1}\n', b"\n", b'{"a": 2}\n')
    assert list(jsonl_rows(path, "fix it")) == [(f"{path} line 1", {"a": 1}), (f"{path} line 3", {"a": 2})]


@pytest.mark.parametrize("bad, reason", [
    (b'{"a": \n', "not valid JSON (expecting value at column 7); remove the line"),
    # With its newline, an open string used to read "Invalid control character at", cut off and wrong.
    (b'{"a": 1, "b": "no closing quote\n',
     "not valid JSON (unterminated string starting at column 15); remove the line"),
    (b'{"a": 1, "b": "a\ttab"}\r\n', "not valid JSON (invalid control character '\\t' at column 17); remove the line"),
    (b'{"a": "caf\xe9"}\n', "not UTF-8 text; save the file as UTF-8")])
def test_a_bad_line_is_named_with_its_file_reason_and_advice(tmp_path, bad, reason):
    path = write_lines(tmp_path, b'{"a": 1}\n', bad, b'{"a": 3}\n')
    with pytest.raises(FlowError) as error:
        list(jsonl_rows(path, "remove the line"))
    assert str(error.value) == f"{path} line 2: {reason}"


def test_a_file_cut_off_by_a_crash_ends_at_its_last_whole_row(tmp_path):
    torn = write_lines(tmp_path, b'{"a": 1}\n', b'{"a": 2}\n', b'{"a": ')
    assert [row for _, row in jsonl_rows(torn, None)] == [{"a": 1}, {"a": 2}]
    unfinished = write_lines(tmp_path, b'{"a": 1}\n', b'{"a": 2}')  # whole JSON, but its newline never written
    assert [row for _, row in jsonl_rows(unfinished, None)] == [{"a": 1}]
    garbled = write_lines(tmp_path, b'{"a": 1}\n', b"\xff\n", b'{"a": 3}\n')
    assert [row for _, row in jsonl_rows(garbled, None)] == [{"a": 1}]
