"""REPORT_TO: the trackers the Trainer logs to, refused at start when one is not installed; their
keys never printed. The whole run with a stand-in tracker is in tests/test_secrets.py."""

import sys

import pytest

import finetune_paligemma2 as flow
from helpers import run_flow
from paligemma_json import FlowError
from paligemma_json.keys import SECRET_ENV_VARS, mask_secrets
from paligemma_json.tracking import TRACKERS, check_tracking_settings, trackers

FAKE_KEY = "FAKE-tracker-key-5f4e3d2c1b"


def test_the_trackers_are_the_trainers_own():
    """A transformers upgrade that adds or renames a tracker fails here, not in a user's run."""
    from transformers.integrations import integration_utils
    assert set(TRACKERS) == set(integration_utils.INTEGRATION_TO_CALLBACK)
    for check, _ in TRACKERS.values():
        assert callable(getattr(integration_utils, check))


@pytest.mark.parametrize("report_to, expected", [
    (["tensorboard"], ["tensorboard"]), ("tensorboard", ["tensorboard"]), (["none"], "none"), ("none", "none"),
    (["all"], "all"), ([], "none"), (["tensorboard,"], ["tensorboard"]),
    (["tensorboard", "tensorboard"], ["tensorboard"])])
def test_report_to_takes_what_the_trainer_takes(report_to, expected):
    assert trackers(report_to) == expected


@pytest.mark.parametrize("report_to, message", [
    (["wandb"], "REPORT_TO names wandb, which is not available here: pip install wandb"),
    (["tensorboard,wandb"], "names wandb.*pip install wandb"),
    (["tensorboard", "mlflow"], "names mlflow.*pip install mlflow"),
    (["trackio"], "pip install trackio"),
    (["wanbd"], "wanbd is not a tracker the Trainer knows; give none, all, or any of .*wandb"),
    (["none", "wandb"], "none and all stand alone")])
def test_an_unusable_tracker_is_one_line(report_to, message, monkeypatch):
    for package in ("wandb", "mlflow", "trackio"):  # not installed, wherever the tests run
        monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(FlowError, match=message):
        trackers(report_to)


def test_a_missing_tracker_stops_the_run_before_any_data_or_model(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    output_dir = tmp_path / "out"
    # The dataset is missing too: a check made after step 1 would fail on that instead.
    with pytest.raises(FlowError, match="pip install wandb"):
        run_flow(monkeypatch, "--report-to", "tensorboard", "wandb", "--dataset-dir", str(tmp_path / "none"),
                 "--output-dir", str(output_dir))
    assert not output_dir.exists()


def test_negative_patience_is_one_line():
    with pytest.raises(FlowError, match="EARLY_STOPPING_PATIENCE is -1: give 0"):
        check_tracking_settings(flow.REPORT_TO, -1)


def test_every_trackers_key_is_a_secret():
    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "COMET_API_KEY",
                 "NEPTUNE_API_TOKEN", "HF_TOKEN", "ROBOFLOW_API_KEY"):
        assert name in SECRET_ENV_VARS


def test_secrets_are_masked_and_short_values_left_alone(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_KEY)
    monkeypatch.setenv("WANDB_API_KEY", "short")  # no real key: masking it would garble words
    assert mask_secrets(f"https://host/?token={FAKE_KEY} a short word") == "https://host/?token=*** a short word"


def test_a_key_of_exactly_the_shortest_length_is_masked(monkeypatch):
    """The documented edge: shorter than SHORTEST_SECRET (8) is left alone, 8 characters are a key."""
    monkeypatch.setenv("COMET_API_KEY", "k3y-8chr")
    monkeypatch.setenv("WANDB_API_KEY", "7-chars")
    assert mask_secrets("k3y-8chr and 7-chars") == "*** and 7-chars"


def test_the_settings_line_never_shows_a_secret(monkeypatch, tmp_path, capsys):
    """A key pasted into a flag by mistake is printed as *** in the settings line and in the error."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    with pytest.raises(FlowError):  # --evaluate of a missing file: the settings line, then its error
        run_flow(monkeypatch, "--evaluate", str(tmp_path / "missing.jsonl"), "--push-to-hub", FAKE_KEY)
    printed = capsys.readouterr().out
    assert "PUSH_TO_HUB=***" in [part for line in printed.splitlines() if line.startswith("settings: ")
                                 for part in line.removeprefix("settings: ").split(", ")]
    assert FAKE_KEY not in printed


def test_a_one_line_error_never_shows_a_secret(monkeypatch, capsys):
    monkeypatch.setenv("NEPTUNE_API_TOKEN", FAKE_KEY)
    with pytest.raises(SystemExit):
        flow.report_flow_errors(FlowError, FlowError(f"cannot reach https://host/?token={FAKE_KEY}"), None)
    assert capsys.readouterr().err == "error: cannot reach https://host/?token=***\n"
