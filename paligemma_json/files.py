"""Writing results so that a crash never leaves a file or folder that looks complete but is not."""

import json
import os
import shutil

from paligemma_json.json_text import jsonl_rows


def replace_atomically(write, final_path: str) -> str:
    """`write(temporary_path)`, then rename it onto `final_path`; says "replaced" or "wrote", for the
    line that tells the user."""
    replaced = os.path.exists(final_path)
    temporary = final_path + ".tmp"
    if os.path.isdir(temporary):
        shutil.rmtree(temporary)
    write(temporary)
    if os.path.isdir(final_path):
        shutil.rmtree(final_path)  # a folder cannot be renamed onto a non-empty one
    os.replace(temporary, final_path)
    return "replaced" if replaced else "wrote"


def write_text_atomically(text: str, path: str) -> str:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(text)
    return replace_atomically(write, path)


def write_json_atomically(data, path: str) -> str:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
    return replace_atomically(write, path)


def write_jsonl_atomically(rows: list[dict], path: str) -> str:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    return replace_atomically(write, path)


def append_jsonl(path: str, kept: list[dict], new_rows) -> list[dict]:
    """`kept` written whole (so a line torn by a crash goes), then each new row appended and flushed as
    it comes, so a run cut off later loses none of them."""
    write_jsonl_atomically(kept, path)
    rows = list(kept)
    with open(path, "a", encoding="utf-8") as out:
        for row in new_rows:
            out.write(json.dumps(row) + "\n")
            out.flush()
            rows.append(row)
    return rows


def read_saved_json(path: str):
    """What a JSON file the flow saved holds; None when there is none; a ValueError when it is not JSON."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def completed_rows(predictions_path: str, entries: list[dict]) -> list[dict]:
    """The rows of an earlier, cut-off prediction run that match `entries` in order; a line torn by
    the crash ends them."""
    rows = []
    if os.path.isfile(predictions_path):
        for (_, row), entry in zip(jsonl_rows(predictions_path, None), entries):
            if not isinstance(row, dict) or row.get("image") != entry["image"]:
                break
            rows.append(row)
    return rows
