"""The one-file notebook for Colab: no clone, no git host. Its first cell writes this package and
`requirements.txt` into the working directory (and, in Colab, installs the requirements); the
script's cells follow unchanged, and step 0 sees `paligemma_json/` and clones nothing.

    pip install jupytext && python -m paligemma_json.notebook [finetune_paligemma2_colab.ipynb]

jupytext is needed here, where the notebook is written, never in Colab.
"""

import os
import sys
from pathlib import Path

from paligemma_json import FlowError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = "finetune_paligemma2_colab.ipynb"

# `# @title` with `cellView: form` is how Colab folds a cell: the package's text stays out of the way.
UNPACK_CELL = '''\
# @title Write the helper package `paligemma_json/` and `requirements.txt` here, and in Colab install them
import os
import subprocess
import sys


def write_carried_files(files):  # a function, so no UPPER_CASE global joins step 1's settings
    for path, text in files.items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as file:  # newline="": the bytes as exported
            file.write(text)


write_carried_files({{
{entries}
}})
if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
if "google.colab" in sys.modules:  # elsewhere, install once yourself: pip install -r requirements.txt
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)
'''


def carried_files(root: Path = ROOT) -> dict[str, str]:
    """Every .py file of the package and requirements.txt, by their paths relative to the repository."""
    paths = sorted(path for path in (root / "paligemma_json").rglob("*.py") if "__pycache__" not in path.parts)
    paths.append(root / "requirements.txt")
    return {path.relative_to(root).as_posix(): read_exactly(path) for path in paths}


def read_exactly(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as file:  # newline="": keep the bytes, line ends included
        return file.read()


def unpack_cell_source(files: dict[str, str]) -> str:
    entries = "\n".join(f"    {path!r}: {text!r}," for path, text in files.items())
    return UNPACK_CELL.format(entries=entries)


def one_file_notebook(root: Path = ROOT):
    """The script as a notebook, after the cell that carries the package."""
    try:
        import jupytext
        import nbformat
    except ImportError:
        raise FlowError("writing the notebook needs jupytext (here, not in Colab): pip install jupytext") from None
    notebook = jupytext.read(root / "finetune_paligemma2.py", fmt="py:percent")
    unpack = nbformat.v4.new_code_cell(unpack_cell_source(carried_files(root)), metadata={"cellView": "form"})
    notebook.cells.insert(0, unpack)
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"},
                         "accelerator": "GPU", "colab": {"gpuType": "T4"}}  # as Colab saves a GPU notebook (unchecked here)
    nbformat.validate(notebook)
    return notebook


def write_one_file_notebook(path: str, root: Path = ROOT) -> None:
    if not path.endswith(".ipynb"):
        raise FlowError(f"{path} is not a notebook name: give one ending in .ipynb")
    notebook = one_file_notebook(root)
    import nbformat  # present: jupytext depends on it
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nbformat.write(notebook, path)


def main(argv: list[str]) -> None:
    if len(argv) > 1 or any(arg.startswith("-") for arg in argv):
        raise FlowError(f"usage: python -m paligemma_json.notebook [OUT.ipynb] (default {DEFAULT_OUTPUT})")
    path = argv[0] if argv else DEFAULT_OUTPUT
    write_one_file_notebook(path)
    print(f"wrote {path}: upload it to Colab (File > Upload notebook) and run all cells; "
          "it needs no copy of this repository")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except FlowError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
