"""A JSON Schema inferred from the training labels (or the user's own): the structure predictions
should have. It is what `schema_valid_rate` checks, and what constrained decoding holds generation to,
in the layout the labels are written in (their separators), which it carries under `x-guidance`."""

import json
import math
import os

from paligemma_json import FlowError
from paligemma_json.files import write_json_atomically
from paligemma_json.json_text import json_error_reason, json_type

LENGTH_MARGIN = 0.5  # a string or list may be half again as long as the longest seen: real documents vary


def _with_margin(longest: int) -> int:
    return longest + max(2, math.ceil(longest * LENGTH_MARGIN))


def _merge(values: list) -> dict:
    """One schema for every value seen at one place in the labels."""
    kinds = {json_type(value) for value in values}
    if {"integer", "number"} <= kinds:
        kinds.discard("integer")  # a field that is 3 in one label and 2.5 in another is a number
    branches = []
    if "object" in kinds:
        objects = [value for value in values if isinstance(value, dict)]
        keys = list(dict.fromkeys(key for value in objects for key in value))  # first-seen order
        branches.append({"type": "object",
                         "properties": {key: _merge([value[key] for value in objects if key in value]) for key in keys},
                         "required": [key for key in keys if all(key in value for value in objects)],
                         "additionalProperties": False})
    if "array" in kinds:
        arrays = [value for value in values if isinstance(value, list)]
        items = [item for value in arrays for item in value]
        branches.append({"type": "array", "maxItems": _with_margin(max(map(len, arrays))),
                         **({"items": _merge(items)} if items else {})})
    scalars = sorted(kinds - {"object", "array"})
    if scalars:
        branch = {"type": scalars[0] if len(scalars) == 1 else scalars}
        if "string" in kinds:
            branch["maxLength"] = _with_margin(max(len(value) for value in values if isinstance(value, str)))
        numbers = [value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)]
        # One digit more than the largest seen, else an unsure model writes digits forever (after
        # a decimal point it still can: a schema cannot bound those).
        if numbers:
            bound = 10 ** (len(str(int(max(map(abs, numbers))))) + 1) - 1
            branch.update(minimum=0 if min(numbers) >= 0 else -bound, maximum=bound)
        branches.append(branch)
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def infer_schema(labels: list) -> dict:
    """From parsed labels: objects with their properties in first-seen order, `required` the keys
    present every time, no other keys; arrays with merged items and a `maxItems`; scalars with the
    types seen; strings with a `maxLength`; numbers within one more digit than the largest seen, and
    not negative unless one was. Lengths get a margin over the longest seen."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **_merge(labels)}


def schema_from_labels(labels: list):
    """The inferred schema from the parsed labels, or None (with a notice) when some are not JSON
    (None): captions and answers have no structure to hold."""
    if any(label is None for label in labels):
        print(f"note: {sum(label is None for label in labels)} train/valid labels are not JSON: no schema, so free "
              "decoding and no schema_valid_rate")
        return None
    return infer_schema(labels)


def load_schema(path: str) -> dict:
    """A user's own schema (`--schema FILE`), checked to be a valid JSON Schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    try:
        with open(path, encoding="utf-8") as file:
            schema = json.load(file)
        Draft202012Validator.check_schema(schema)
    except (OSError, json.JSONDecodeError, SchemaError) as error:
        message = getattr(error, "message", None) or str(error)
        raise FlowError(f"{path}: not a usable JSON Schema ({message.splitlines()[0][:200]}); fix it or drop --schema") from None
    return schema


def count_non_json_labels(dataset) -> int:
    return sum(entry.label is None for entry in dataset.entries)  # parsed once, when loaded (documents.Entry)


def label_problem(suffix: str) -> str:
    """What keeps a label from being a JSON object or array, in the words a broken JSONL line gets."""
    try:
        value = json.loads(suffix)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({json_error_reason(error)})"
    return f"a JSON {json_type(value)}, not an object or array"


def check_json_labels(splits: dict, skip: bool) -> list[str]:
    """Labels that are not JSON where most are: a broken label, not another task. Each is named by
    file and line with what is wrong; the run stops in one line unless `skip` (SKIP_NON_JSON_LABELS),
    which leaves those rows out of their split, printed, and keeps them in its `left_out` for the
    dataset report; returns them.
    Where most labels are not JSON (captions, answers) they train as they are, said."""
    bad = [(split, entry) for split, data in splits.items() for entry in data.entries if entry.label is None]
    total = sum(len(data.entries) for data in splits.values())
    if not bad:
        return []
    if 2 * len(bad) >= total:
        print(f"warning: {len(bad)} labels are not JSON objects or arrays; the JSON metrics leave them out")
        return []
    named = [f"{entry.where}: the label is {label_problem(entry['suffix'])}" for _, entry in bad]
    if not skip:
        more = f"; also {', '.join(entry.where for _, entry in bad[1:6])}" if len(bad) > 1 else ""
        more += f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        raise FlowError(f"{named[0]}, while {total - len(bad)} of {total} labels are JSON{more}; fix the "
                        "label (or set SKIP_NON_JSON_LABELS, --skip-non-json-labels, to leave such rows out)")
    for split, data in splits.items():
        kept = [entry for entry in data.entries if entry.label is not None]
        if not kept:
            raise FlowError(f"{split}: no row left once labels that are not JSON are left out; fix the labels")
        data.left_out = [line for line, (of, _) in zip(named, bad) if of == split]
        data.entries[:] = kept
    for line in named:
        print(f"left out: {line}")
    print(f"labels: {len(bad)} rows whose label is not JSON left out (SKIP_NON_JSON_LABELS)")
    return named


def save_label_schema(schema: dict | None, output_dir: str) -> None:
    """What `--evaluate` scores against; with labels that are not JSON, no earlier run's schema either."""
    path = os.path.join(output_dir, "schema.json")
    if schema is not None:
        write_json_atomically(schema, path)
    elif os.path.exists(path):
        os.remove(path)


def read_saved_schema(folder: str) -> dict | None:
    """The `schema.json` a run saved in `folder` (OUTPUT_DIR or final/), or None: labels that are not JSON."""
    path = os.path.join(folder, "schema.json")
    return load_schema(path) if os.path.isfile(path) else None


# --- The layout the labels are written in --------------------------------------------------------

_NOT_JSON = object()


def _decoded(suffix: str, label):
    """`label` as loading parsed it; a suffix it took for no object or array (a number, a caption) is
    decoded here, since a user's schema may still describe it."""
    if label is not None:
        return label
    try:
        return json.loads(suffix)
    except json.JSONDecodeError:
        return _NOT_JSON


def _written_with(suffix: str, value, item: str, key: str) -> bool:
    return value is not _NOT_JSON and suffix in (json.dumps(value, separators=(item, key)),
                                                 json.dumps(value, separators=(item, key), ensure_ascii=False))


def json_layout(suffixes: list[str], labels: list | None = None) -> dict:
    """llguidance's options for the separators the labels use: `", "` and `": "` as `json.dumps`
    writes them, or the compact `","` and `":"`. Otherwise whitespace is free but bounded, so a
    model cannot spend its budget on spaces. `labels`: the suffixes as already parsed, if they were."""
    values = [_decoded(suffix, label) for suffix, label in zip(suffixes, labels or [None] * len(suffixes))]
    for item, key in ((", ", ": "), (",", ":")):
        if suffixes and all(_written_with(suffix, value, item, key) for suffix, value in zip(suffixes, values)):
            return {"item_separator": item, "key_separator": key, "whitespace_flexible": False}
    return {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,64}"}


def with_layout(schema: dict, suffixes: list[str], labels: list | None = None) -> dict:
    """The schema with the labels' layout under `x-guidance` (llguidance reads it, JSON Schema
    validators ignore it), unless the user's schema says otherwise: saved with it, so `--predict`
    writes the way the model was trained to."""
    return {**schema, "x-guidance": {**json_layout(suffixes, labels), **schema.get("x-guidance", {})}}


DEFAULT_LAYOUT = {"item_separator": ", ", "key_separator": ": "}  # json.dumps's own separators


def label_layout(schema: dict | None) -> list[str]:
    """[item separator, key separator] the labels are written with (`x-guidance`, as `with_layout`
    saves it), for the review page's export; json.dumps's default where the labels' spacing was free."""
    guidance = (schema or {}).get("x-guidance", {})
    if "item_separator" not in guidance or "key_separator" not in guidance:
        guidance = DEFAULT_LAYOUT
    return [guidance["item_separator"], guidance["key_separator"]]


def label_schema(splits: dict, schema_path: str = "") -> dict | None:
    """The structure predictions should have: the user's schema, or one inferred from the train and
    valid labels (None when they are not JSON), with the labels' separators for the grammar."""
    entries = [entry for split in ("train", "valid") for entry in splits[split].entries]
    suffixes, labels = [entry["suffix"] for entry in entries], [entry.label for entry in entries]
    schema = load_schema(schema_path) if schema_path else schema_from_labels(labels)
    return None if schema is None else with_layout(schema, suffixes, labels)
