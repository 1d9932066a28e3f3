"""Writing results so that a crash never leaves a file or folder that looks complete but is not."""

import json
import os
import shutil


def replace_atomically(write, final_path: str) -> None:
    """`write(temporary_path)`, then rename it onto `final_path`."""
    temporary = final_path + ".tmp"
    if os.path.isdir(temporary):
        shutil.rmtree(temporary)
    write(temporary)
    if os.path.isdir(final_path):
        shutil.rmtree(final_path)  # a folder cannot be renamed onto a non-empty one
    os.replace(temporary, final_path)


def write_json_atomically(data, path: str) -> None:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
    replace_atomically(write, path)
