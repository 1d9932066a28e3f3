"""The rules for JSON text that the whole package shares, each written once: what counts as a parsed
label or prediction, how a field is named (Donut's key paths), a value's JSON type, and how a JSON
Lines file is read. It imports nothing else of the package but FlowError, so every module can import it."""

import json
from collections.abc import Iterator

from paligemma_json import FlowError


def parse_json(text: str, object_pairs_hook=None):
    """The parsed object or array, or None: no repair, so a truncated list counts as invalid.
    `object_pairs_hook`: json.loads's, to see each object's keys as written."""
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, (dict, list)) else None


# --- Key paths ----------------------------------------------------------------------------------

def child_path(parent: str, key: str) -> str:
    """The path of `key` inside the object at `parent` ("" at the top): `parent.key`. A list's
    items take the list's own path, with no index, as in Donut: `items.qty` names every item's
    quantity, so fields are counted and matched across documents with lists of any length."""
    return f"{parent}.{key}" if parent else key


def _is_scalar(value) -> bool:
    return not isinstance(value, (dict, list))


def key_paths(value, is_leaf=_is_scalar, path: str = "") -> Iterator[tuple[str, object]]:
    """(key path, leaf) for each leaf of a parsed JSON value, in order. `is_leaf` says where the
    walk stops (it must hold for scalars): by default at scalars, so an empty object or list gives
    nothing."""
    if is_leaf(value):
        yield path, value
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from key_paths(child, is_leaf, child_path(path, key))
    else:
        for item in value:
            yield from key_paths(item, is_leaf, path)


# --- Types --------------------------------------------------------------------------------------

def json_type(value) -> str:
    """A parsed value's JSON Schema type: `integer` for a whole number as written (3, not 3.0), and
    `boolean`, not `integer`, for true and false (Python counts them as ints)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {dict: "object", list: "array", str: "string", float: "number", type(None): "null"}[type(value)]


# --- JSON Lines ---------------------------------------------------------------------------------

def json_error_reason(error: json.JSONDecodeError) -> str:
    """What is wrong in a one-line JSON text, and at which column (from 1): the decoder's message ends
    in "at" when it means its position ("Unterminated string starting at"), which alone reads cut off."""
    reason = error.msg.removesuffix(" at")
    if reason == "Invalid control character" and error.pos < len(error.doc):
        reason += f" {ascii(error.doc[error.pos])}"  # a raw tab or line break inside a string: say which
    return f"{reason[:1].lower()}{reason[1:]} at column {error.colno}"


def jsonl_rows(path: str, advice: str | None) -> Iterator[tuple[str, object]]:
    """(where, row) for each non-blank line of a JSON Lines file; `where` ("PATH line N") is for the
    caller's own messages about a row. Lines are decoded one by one, so a line that is not UTF-8 is
    named, not the whole file. A line that is not UTF-8 JSON is a FlowError naming it, what is wrong
    and at which column, and what to do: save as UTF-8, or `advice` for bad JSON. With `advice` None
    the file is one a crash may have cut off while rows were appended: a bad line, or a last line
    without its newline, quietly ends the rows."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            where = f"{path} line {number}"
            try:
                # Without its line ending, a string left open reads as unterminated, not as a raw line break.
                row = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                reason, remedy = "not UTF-8 text", "save the file as UTF-8"
            except json.JSONDecodeError as error:
                reason, remedy = f"not valid JSON ({json_error_reason(error)})", advice
            else:
                if advice is None and not raw.endswith(b"\n"):
                    return  # a row is written with its newline: without it, the write did not finish
                yield where, row
                continue
            if advice is None:
                return
            raise FlowError(f"{where}: {reason}; {remedy}")
