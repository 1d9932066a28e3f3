"""The script under a launcher, on two CPU processes over gloo: torchrun's DDP halves the steps and
predicts each test row once; (slow) `accelerate launch`, with and without the FSDP config, which on CPUs
falls back to DDP. Sharding itself: tests/test_fsdp.py."""

import json
import os
import subprocess
import sys

import pytest

from helpers import (ROOT, SCRIPT, assert_validation_equals_one_process, free_port, run_script, short_run_args,
                     trained_start_args)


def test_two_cpu_processes_halve_the_steps_and_predict_each_test_row_once(demo_run, small_export, tmp_path):
    output_dir = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master-port={free_port()}", SCRIPT,
                             *trained_start_args(demo_run, small_export, output_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.load(open(output_dir / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4  # 32 rows / (batch 4 × 2 processes); one process takes 8
    assert result.stdout.count("training: 4 steps") == 1  # the second process stops after training
    rows = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    truth = [json.loads(line)["image"] for line in open(os.path.join(small_export, "test", "annotations.jsonl"))]
    assert [row["image"] for row in rows] == truth  # every test row exactly once
    assert "Traceback" not in result.stderr
    # Each process generated half the validation rows; the figures are the whole split's.
    assert_validation_equals_one_process(output_dir, small_export)


def test_the_demo_refuses_a_launcher_in_one_line(tmp_path):
    result = run_script("--demo", "--output-dir", str(tmp_path / "out"), env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2 and result.stderr.startswith("error: --demo builds its data in one process")


def launch(*launcher, script_args, output_dir):
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launcher,
                             f"--main_process_port={free_port()}", SCRIPT, *script_args],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.load(open(output_dir / "checkpoint-4" / "trainer_state.json"))


@pytest.mark.slow
def test_accelerate_launch_runs_two_cpu_processes(demo_run, small_export, tmp_path):
    """`--cpu --num_processes 2` silently starts one process; `--multi_gpu` is the working CPU form.
    Each process generates half the validation rows; the logged figures are the whole split's."""
    args = trained_start_args(demo_run, small_export, tmp_path / "out")
    state = launch("--multi_gpu", "--num_processes", "2", script_args=args, output_dir=tmp_path / "out")
    assert state["global_step"] == 4
    assert_validation_equals_one_process(tmp_path / "out", small_export)


@pytest.mark.slow
def test_the_fsdp_config_is_accepted_on_cpu(demo_assets, small_export, tmp_path):
    """On CPU accelerate falls back to multi-process DDP: this proves the config and the flow, not sharding."""
    args = short_run_args(small_export, demo_assets[1], tmp_path / "out", "--epochs", "1", "--max-steps", "-1")
    state = launch("--config_file", os.path.join(ROOT, "configs", "fsdp.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", script_args=args, output_dir=tmp_path / "out")
    assert state["global_step"] == 4
