"""`final/` holds the best checkpoint's weights, not the last one's: a short run, in this process,
whose validation field F1 is scripted to peak before the end."""

import json
import os

import pytest

from helpers import assert_final_holds_the_best, run_flow, short_run_args

SCRIPTED_F1 = {4: 0.3, 8: 0.8, 12: 0.5}  # validation field F1 by step: the best, step 8, is not the last


@pytest.mark.parametrize("mode", [["--no-use-lora"], ["--use-lora", "--learning-rate", "1e-2"]], ids=["full", "lora"])
def test_final_holds_the_best_checkpoint_not_the_last(mode, demo_assets, small_export, tmp_path, monkeypatch, capsys,
                                                      scripted_validation_f1):
    scripted_validation_f1(SCRIPTED_F1.values())
    output_dir = tmp_path / "run"
    run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], output_dir, *mode, "--max-steps", "12",
                                          "--save-steps", "4", "--max-new-tokens", "4", "--no-constrained",
                                          "--no-dataset-report"))
    state = json.load(open(output_dir / "checkpoint-12" / "trainer_state.json"))
    assert {entry["step"]: entry["eval_field_f1"] for entry in state["log_history"]
            if "eval_field_f1" in entry} == SCRIPTED_F1  # the scripted figures are what the Trainer saw
    assert state["best_global_step"] == 8
    assert sorted(os.listdir(output_dir / "checkpoint-8"))  # kept: the best is never rotated away
    assert_final_holds_the_best(output_dir, "checkpoint-8", "checkpoint-12")
    assert "(step 8, validation field_f1 0.8000)" in capsys.readouterr().out
