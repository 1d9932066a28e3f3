"""Cut-off runs: training killed with SIGKILL after a checkpoint resumes to the same losses, and cut-off
test-set inference predicts only the rows still missing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import SCRIPT, run_script, short_run_args


def losses_by_step(output_dir):
    state = json.load(open(os.path.join(output_dir, "checkpoint-24", "trainer_state.json")))
    assert state["global_step"] == 24
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def kill_after_checkpoint(args, checkpoint_dir, timeout=300):
    """Runs the script and SIGKILLs it as soon as `checkpoint_dir` is complete."""
    process = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.isfile(os.path.join(checkpoint_dir, "trainer_state.json")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode


# The full fine-tune's case behind `slow` (36 s): the fast suite reached its 10-minute budget; LoRA, the default, stays.
@pytest.mark.parametrize("mode", [pytest.param([], id="full", marks=pytest.mark.slow),
                                  pytest.param(["--use-lora", "--learning-rate", "1e-2"], id="lora")])
def test_sigkill_then_resume_gives_the_uninterrupted_losses(demo_assets, small_export, tmp_path, mode):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_script(*short_run_args(small_export, demo_assets[1], straight, *mode)).returncode == 0
    args = short_run_args(small_export, demo_assets[1], interrupted, *mode)
    assert kill_after_checkpoint(args, interrupted / "checkpoint-8") == -signal.SIGKILL
    assert not (interrupted / "final").exists()

    refused = run_script(*args)  # a cut-off run is not silently mixed with a new one
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_script(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: training from" in resumed.stdout
    expected, got = losses_by_step(straight), losses_by_step(interrupted)
    assert [step for step, _ in got] == list(range(1, 25))
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-4, abs=1e-5)
    assert json.load(open(interrupted / "metrics.json")) == json.load(open(straight / "metrics.json"))


def test_cut_off_predictions_are_completed_not_redone(demo_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(demo_run[0], output_dir)
    full = (output_dir / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (output_dir / "predictions.jsonl").write_bytes(b"".join(full[:10]) + full[10][:60])  # torn mid-line
    (output_dir / "metrics.json").unlink()
    before = sorted(os.listdir(output_dir))
    validation_written = (output_dir / "validation_predictions.jsonl").stat().st_mtime_ns

    result = run_script("--demo", "--resume", "--output-dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume: training finished" in result.stdout
    assert "predictions: 10 of 24 already in" in result.stdout
    redone = (output_dir / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    assert redone[:10] == full[:10] and len(redone) == 24  # kept as they were, then the rest appended
    predictions = [json.loads(line)["prediction"] for line in redone]
    assert predictions == [json.loads(line)["prediction"] for line in full]  # greedy: the same texts again
    assert sorted(os.listdir(output_dir)) == sorted(before + ["metrics.json"])  # no training, nothing new
    # The threshold saved in final/ is reused: validation is not decoded again.
    assert "saved in " + str(output_dir / "final") + "; reused" in result.stdout
    assert (output_dir / "validation_predictions.jsonl").stat().st_mtime_ns == validation_written
    assert json.load(open(output_dir / "metrics.json"))["confidence_threshold_source"] == "validation"
