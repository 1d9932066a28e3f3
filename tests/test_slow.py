"""Longer checks that CI deselects: python -m pytest -m slow"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT, short_run_args
from test_scale import free_port

pytestmark = pytest.mark.slow


def launch(*launcher, script_args, output_dir):
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher,
                             f"--main_process_port={free_port()}", SCRIPT, *script_args],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.load(open(output_dir / "checkpoint-4" / "trainer_state.json"))


def test_accelerate_launch_runs_two_cpu_processes(demo_assets, small_export, tmp_path):
    """`--cpu --num_processes 2` silently starts one process; `--multi_gpu` is the working CPU form."""
    args = short_run_args(small_export, demo_assets[1], tmp_path / "out", "--epochs", "1", "--max-steps", "-1")
    state = launch("--multi_gpu", "--num_processes", "2", script_args=args, output_dir=tmp_path / "out")
    assert state["global_step"] == 4


def test_the_fsdp_config_is_accepted_on_cpu(demo_assets, small_export, tmp_path):
    """On CPU accelerate falls back to multi-process DDP: this proves the config and the flow, not sharding."""
    args = short_run_args(small_export, demo_assets[1], tmp_path / "out", "--epochs", "1", "--max-steps", "-1")
    state = launch("--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", script_args=args, output_dir=tmp_path / "out")
    assert state["global_step"] == 4


def test_the_notebook_runs_top_to_bottom(tmp_path):
    """The Colab path: jupytext turns the script into a notebook that a Jupyter kernel runs in order."""
    for module in ("jupytext", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"{module.upper()} NOT INSTALLED: the notebook was not run "
                                           "(pip install jupytext nbclient ipykernel)")
    import jupytext
    from nbclient import NotebookClient
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "paligemma2_json_extraction", "__pycache__"))
    source = (work / "finetune_paligemma2.py").read_text()
    source = source.replace("DEMO = False  #", "DEMO = True  #").replace(
        'OUTPUT_DIR = "paligemma2_json_extraction"', f'OUTPUT_DIR = "{tmp_path / "out"}"')
    notebook = jupytext.reads(source, fmt="py:percent")
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["json_valid_rate"] >= 0.8
    names = {name for cell in notebook.cells if cell.cell_type == "code" for name in ("trainer", "model")
             if name in cell.source}
    assert names == {"trainer", "model"}
