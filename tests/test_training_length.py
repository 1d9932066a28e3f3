"""How long a run trains: early stopping on validation field F1, and fractional EPOCHS."""

import json
import math
import os

import pytest
from transformers import TrainerControl, TrainerState

from helpers import assert_final_holds_the_best, run_flow, short_run_args
from paligemma_json.training import EarlyStopping


def stopping_step(scores: list[float], patience: int, every: int = 4):
    """The step at which EarlyStopping stops a run whose evaluations (every `every` steps) score
    `scores`, or None when it runs to the end; fed the log the way the Trainer logs."""
    callback, state, control = EarlyStopping(patience), TrainerState(), TrainerControl()
    for index, score in enumerate(scores):
        state.global_step = every * (index + 1)
        for logs in ({"loss": 1.0}, {"eval_loss": 1.0}, {"eval_field_f1": score, "eval_json_valid_rate": 1.0}):
            state.log_history.append({**logs, "step": state.global_step})
            callback.on_log(None, state, control, logs=logs)
            if control.should_training_stop:
                return state.global_step
    return None


@pytest.mark.parametrize("scores, patience, step", [
    ([0.3, 0.8, 0.5, 0.6, 0.9], 2, 16),  # two evaluations below the best
    ([0.3, 0.8, 0.5, 0.6, 0.9], 3, None),  # 0.9 came in time
    ([0.3, 0.8, 0.8, 0.9], 1, 12),  # a tie is no rise
    ([0.1, 0.2, 0.3, 0.4], 1, None),  # rising all along
    ([0.5, 0.4], 1, 8)])
def test_patience_counts_evaluations_since_the_best(scores, patience, step):
    assert stopping_step(scores, patience) == step


def test_a_resumed_run_counts_the_evaluations_before_the_cut():
    """The count comes from the log, which a checkpoint carries: a fresh callback (as after
    --resume) stops at the same evaluation."""
    callback, state, control = EarlyStopping(2), TrainerState(), TrainerControl()
    state.log_history = [{"eval_field_f1": 0.8, "step": 4}, {"eval_field_f1": 0.5, "step": 8}]  # from the checkpoint
    state.log_history.append({"eval_field_f1": 0.6, "step": 12})
    callback.on_log(None, state, control, logs=state.log_history[-1])
    assert control.should_training_stop


SCRIPTED_F1 = [0.3, 0.8, 0.5, 0.8, 0.9, 0.9]  # at steps 2, 4, ...: the best, step 4, is tied at step 8


def test_early_stopping_stops_and_keeps_the_best(demo_assets, small_export, tmp_path, monkeypatch, capsys,
                                                 scripted_validation_f1):
    scripted_validation_f1(SCRIPTED_F1)
    output_dir = tmp_path / "run"
    flow = run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], output_dir, "--save-steps", "2",
                                                 "--early-stopping-patience", "2", "--max-new-tokens", "4",
                                                 "--no-constrained", "--no-dataset-report"))
    assert flow["trainer"].state.max_steps == 24 and flow["trainer"].state.global_step == 8
    state = json.load(open(output_dir / "checkpoint-8" / "trainer_state.json"))
    assert [entry["step"] for entry in state["log_history"] if "eval_field_f1" in entry] == [2, 4, 6, 8]
    assert state["best_global_step"] == 4
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-")) == [
        "checkpoint-4", "checkpoint-8"]
    assert_final_holds_the_best(output_dir, "checkpoint-4", "checkpoint-8")
    assert "(best 0.8000 at step 4); stopping at step 8" in capsys.readouterr().out


def test_fractional_epochs(demo_assets, small_export, tmp_path, monkeypatch):
    """0.5 epochs of 8 steps (32 rows, batch 4): 4 steps, as the Trainer counts them, and the
    evaluation and checkpoint that end every epoch come at the end of the half one too."""
    epochs, steps_per_epoch = 0.5, 8
    output_dir = tmp_path / "run"
    flow = run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], output_dir, "--epochs", str(epochs),
                                                 "--max-steps", "-1", "--save-steps", "0", "--max-new-tokens", "4",
                                                 "--no-constrained", "--no-dataset-report"))
    assert flow["EPOCHS"] == epochs
    state = flow["trainer"].state
    assert state.global_step == math.ceil(epochs * steps_per_epoch) == 4
    assert state.epoch == epochs
    assert [entry["step"] for entry in state.log_history if "eval_field_f1" in entry] == [4]
    assert os.path.isdir(output_dir / "checkpoint-4") and os.path.isdir(output_dir / "final")
