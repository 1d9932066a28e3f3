"""The one-file Colab notebook (`python -m paligemma_json.notebook`), checked without a kernel; the
slow test in test_slow.py runs it top to bottom."""

import os
import subprocess
import sys
import types
from pathlib import Path

import jupytext
import pytest

from helpers import ROOT, SCRIPT
from paligemma_json.notebook import carried_files, unpack_cell_source, write_one_file_notebook

PIP_INSTALL = [sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"]


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    import nbformat
    path = tmp_path_factory.mktemp("export") / "one-file.ipynb"
    write_one_file_notebook(str(path))
    return nbformat.read(path, as_version=4)


def run_cells(cells, folder, monkeypatch, in_colab: bool) -> tuple[dict, list]:
    """The cells' code run in `folder`, as a notebook runs it; commands are recorded, never run."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, **_: commands.append(command))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    namespace = {"__name__": "__main__"}
    for cell in cells:
        exec(compile(cell.source, "<cell>", "exec"), namespace)
    return namespace, commands


def test_the_first_cell_writes_every_package_file_byte_for_byte(notebook, tmp_path, monkeypatch):
    run_cells(notebook.cells[:1], tmp_path, monkeypatch, in_colab=False)
    expected = sorted(path.relative_to(ROOT) for path in Path(ROOT, "paligemma_json").rglob("*.py")
                      if "__pycache__" not in path.parts) + [Path("requirements.txt")]
    written = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    assert written == expected
    for name in expected:
        assert (tmp_path / name).read_bytes() == Path(ROOT, name).read_bytes(), name


def test_line_ends_and_odd_characters_survive_the_trip(tmp_path, monkeypatch):
    """A checkout with CRLF line ends (Windows) or quotes and backslashes in a file stays byte-exact."""
    source = tmp_path / "repo"
    (source / "paligemma_json").mkdir(parents=True)
    odd = "line one\r\nsaid \"\"\" and \'\'\' \\n {braces} é\r\n".encode()
    (source / "paligemma_json" / "odd.py").write_bytes(odd)
    (source / "requirements.txt").write_bytes(b"torch\r\n")
    cell = types.SimpleNamespace(source=unpack_cell_source(carried_files(source)))
    run_cells([cell], tmp_path / "colab", monkeypatch, in_colab=False)
    assert (tmp_path / "colab" / "paligemma_json" / "odd.py").read_bytes() == odd
    assert (tmp_path / "colab" / "requirements.txt").read_bytes() == b"torch\r\n"


@pytest.mark.parametrize("in_colab", [True, False])
def test_only_colab_installs_and_step_0_clones_nothing(notebook, tmp_path, monkeypatch, in_colab):
    step_0 = next(cell for cell in notebook.cells if "REPO_URL =" in cell.source)
    namespace, commands = run_cells([notebook.cells[0], step_0], tmp_path, monkeypatch, in_colab)
    assert commands == ([PIP_INSTALL] if in_colab else [])  # a `git clone` would be recorded here too
    assert str(tmp_path) in sys.path
    assert not [name for name in namespace if name.isupper() and name != "REPO_URL"], \
        "the first cell left an UPPER_CASE global, which step 1 would take for a setting"


def test_the_script_cells_follow_unchanged_and_in_order(notebook):
    script_cells = jupytext.read(SCRIPT, fmt="py:percent").cells
    assert [(cell.cell_type, cell.source) for cell in notebook.cells[1:]] == \
           [(cell.cell_type, cell.source) for cell in script_cells]
    script = open(SCRIPT, encoding="utf-8").read()
    assert len(script_cells) == script.count("\n# %%") + script.startswith("# %%")
    position = 0
    for cell in notebook.cells[1:]:
        if cell.cell_type == "code":
            position = script.index(cell.source, position) + len(cell.source)


def test_a_name_that_is_not_a_notebook_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "paligemma_json.notebook", str(tmp_path / "one-file.py")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)
