"""The one-file Colab notebook (`python -m paligemma_json.notebook`), checked without a kernel; and
(slow) the script as a notebook and the one-file notebook, each run top to bottom in a Jupyter kernel."""

import json
import os
import shutil
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


def need_notebook_tools():
    for module in ("jupytext", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module.upper()} NOT INSTALLED: the notebook was not run "
                                           "(pip install jupytext nbclient ipykernel)")


def with_demo_on(source: str) -> str:
    """The edit a notebook user makes in step 1's cell, since a kernel takes no flags."""
    assert "DEMO = False  #" in source
    return source.replace("DEMO = False  #", "DEMO = True  #")


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(tmp_path):
    """The Colab path: jupytext turns the script into a notebook that a Jupyter kernel runs in order."""
    need_notebook_tools()
    import jupytext
    from nbclient import NotebookClient
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "paligemma2_json_extraction", "__pycache__"))
    source = (work / "finetune_paligemma2.py").read_text()
    source = with_demo_on(source).replace(
        'OUTPUT_DIR = "paligemma2_json_extraction"', f'OUTPUT_DIR = "{tmp_path / "out"}"')
    notebook = jupytext.reads(source, fmt="py:percent")
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["json_valid_rate"] >= 0.8
    names = {name for cell in notebook.cells if cell.cell_type == "code" for name in ("trainer", "model")
             if name in cell.source}
    assert names == {"trainer", "model"}


@pytest.mark.slow
def test_the_one_file_notebook_runs_in_an_empty_folder(tmp_path, monkeypatch):
    """The one-file Colab path: `python -m paligemma_json.notebook`, uploaded alone, run top to bottom.
    The package must come from the notebook's first cell, never from this repository."""
    need_notebook_tools()
    import nbformat
    from nbclient import NotebookClient

    from paligemma_json.notebook import write_one_file_notebook
    folder = tmp_path / "colab"
    write_one_file_notebook(str(folder / "one-file.ipynb"))
    assert os.listdir(folder) == ["one-file.ipynb"]
    notebook = nbformat.read(folder / "one-file.ipynb", as_version=4)
    step_1 = next(cell for cell in notebook.cells if "DEMO = False  #" in cell.source)
    step_1.source = with_demo_on(step_1.source)
    package_init = str(folder / "paligemma_json" / "__init__.py")
    notebook.cells.insert(1, nbformat.v4.new_code_cell(  # checked in the kernel, before the long run
        f"import os, sys, paligemma_json\nassert paligemma_json.__file__ == {package_init!r}, paligemma_json.__file__\n"
        f"assert {os.path.realpath(ROOT)!r} not in {{os.path.realpath(entry) for entry in sys.path}}, sys.path"))
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the kernel inherits the environment, not pytest's sys.path
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    output = folder / "paligemma2_json_extraction"  # OUTPUT_DIR's default, in the kernel's working folder
    assert "field_f1" in json.load(open(output / "metrics.json"))
    assert {"config.json", "adapter_config.json"} & set(os.listdir(output / "final"))
