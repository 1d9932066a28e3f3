"""`--push-to-hub`: the upload's code path, and a push that fails after scoring loses only the upload.
The Hub cannot be reached here; tests/test_secrets.py pushes to a stand-in Hub."""

import json
import os
import shutil

import pytest

import finetune_paligemma2 as flow
from helpers import assert_card_figures_match, run_flow, short_run_args


def test_a_failed_push_after_scoring_loses_only_the_upload(lora_run, demo_assets, small_export, tmp_path, monkeypatch):
    """A copy of the finished LoRA run, resumed in-process without its metrics.json and card: only
    this run's scoring can write them before the push, which sees them and fails."""
    from huggingface_hub import HfApi
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("merged"))
    (run / "metrics.json").unlink()
    (run / "final" / "README.md").unlink()
    weights = (run / "final" / "adapter_model.safetensors").read_bytes()
    seen = {}

    def failing_upload(self, folder_path, repo_id, **kwargs):
        seen.update(card=open(os.path.join(folder_path, "README.md")).read(),
                    metrics=json.load(open(run / "metrics.json")))
        raise ConnectionError("the Hub is unreachable")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", failing_upload)
    with pytest.raises(flow.FlowError) as error:
        run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], run, "--use-lora", "--learning-rate",
                                              "1e-2", "--max-steps", "8", "--save-steps", "4", "--resume",
                                              "--push-to-hub", "someone/pallet-model"))
    assert_card_figures_match(seen["card"], seen["metrics"])  # pushed after scoring, with the card
    final = str(run / "final")
    assert str(error.value) == (f"pushing {final} to someone/pallet-model failed (ConnectionError); the run's results "
                                "are all written. Check HF_TOKEN and that it may write to someone/pallet-model, then "
                                f"upload again: hf upload someone/pallet-model {final} --private")
    assert json.load(open(run / "metrics.json")) == seen["metrics"]  # nothing but the upload is lost
    assert (run / "final" / "README.md").read_text() == seen["card"]
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == weights
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 8


def test_the_hub_push_code_path_uploads_final_and_passes_no_token(monkeypatch, tmp_path):
    """Only the code path: the Hub cannot be reached here, so the upload itself is untested."""
    from huggingface_hub import HfApi
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *a, **k: calls.append(("upload", a, k)))
    flow.push_to_hub(str(tmp_path), "someone/pallet-model")
    assert [call[0] for call in calls] == ["create", "upload"]
    assert calls[0][1] == ("someone/pallet-model",) and calls[0][2]["private"] is True
    assert calls[1][2]["folder_path"] == str(tmp_path) and calls[1][2]["repo_id"] == "someone/pallet-model"
    assert not any("token" in call[2] for call in calls)
