"""Longer checks that CI deselects: python -m pytest -m slow"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, SCRIPT, assert_validation_equals_one_process, free_port, short_run_args, trained_start_args

pytestmark = pytest.mark.slow


def launch(*launcher, script_args, output_dir):
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher,
                             f"--main_process_port={free_port()}", SCRIPT, *script_args],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.load(open(output_dir / "checkpoint-4" / "trainer_state.json"))


def test_accelerate_launch_runs_two_cpu_processes(demo_run, small_export, tmp_path):
    """`--cpu --num_processes 2` silently starts one process; `--multi_gpu` is the working CPU form.
    Each process generates half the validation rows; the logged figures are the whole split's."""
    args = trained_start_args(demo_run, small_export, tmp_path / "out")
    state = launch("--multi_gpu", "--num_processes", "2", script_args=args, output_dir=tmp_path / "out")
    assert state["global_step"] == 4
    assert_validation_equals_one_process(tmp_path / "out", small_export)


def test_the_fsdp_config_is_accepted_on_cpu(demo_assets, small_export, tmp_path):
    """On CPU accelerate falls back to multi-process DDP: this proves the config and the flow, not sharding."""
    args = short_run_args(small_export, demo_assets[1], tmp_path / "out", "--epochs", "1", "--max-steps", "-1")
    state = launch("--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", script_args=args, output_dir=tmp_path / "out")
    assert state["global_step"] == 4


def need_notebook_tools():
    for module in ("jupytext", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module.upper()} NOT INSTALLED: the notebook was not run "
                                           "(pip install jupytext nbclient ipykernel)")


def with_demo_on(source: str) -> str:
    """The edit a notebook user makes in step 1's cell, since a kernel takes no flags."""
    assert "DEMO = False  #" in source
    return source.replace("DEMO = False  #", "DEMO = True  #")


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
