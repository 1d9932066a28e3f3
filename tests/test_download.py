"""The Roboflow step, driven through the real code path with a fake `roboflow` client."""

import os
import shutil
import sys
import types

import pytest

import finetune_paligemma2 as flow

FAKE_KEY = "rf_FAKE_KEY_1234567890"


def fake_roboflow(monkeypatch, download):
    """A `roboflow` module whose client records the key and runs `download(location)`."""
    calls = []

    class Version:
        def download(self, model_format, location=None, overwrite=False):
            calls.append((model_format, location))
            download(location)

    class Roboflow:
        def __init__(self, api_key):
            calls.append(api_key)

        def workspace(self, name):
            calls.append(name)
            return types.SimpleNamespace(project=lambda p: calls.append(p) or types.SimpleNamespace(
                version=lambda v: calls.append(v) or Version()))

    monkeypatch.setitem(sys.modules, "roboflow", types.SimpleNamespace(Roboflow=Roboflow))
    return calls


def test_downloads_the_jsonl_export_with_the_key_from_the_environment(demo_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOFLOW_API_KEY", FAKE_KEY)
    calls = fake_roboflow(monkeypatch, lambda location: shutil.copytree(demo_assets[0], location))
    target = str(tmp_path / "pallet")
    location = flow.download_dataset(target, "roboflow-jvuqo", "pallet-load-manifest-json", 2)
    assert calls == [FAKE_KEY, "roboflow-jvuqo", "pallet-load-manifest-json", 2, ("jsonl", target)]
    assert len(flow.load_splits(location, prompt="")["train"]) == 150


def test_an_existing_export_is_not_downloaded_again(demo_assets, monkeypatch):
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    calls = fake_roboflow(monkeypatch, lambda location: pytest.fail("downloaded again"))
    assert flow.download_dataset(demo_assets[0], "w", "p", 1) == demo_assets[0]
    assert calls == []


def test_no_key_and_no_data_says_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBOFLOW_API_KEY", raising=False)
    with pytest.raises(flow.FlowError) as error:
        flow.download_dataset(str(tmp_path / "absent"), "w", "p", 1)
    assert "ROBOFLOW_API_KEY" in str(error.value) and "--dataset-dir" in str(error.value)


def test_a_failed_download_masks_the_key(tmp_path, monkeypatch):
    """roboflow 1.7.3 puts the key in the URL of its ConnectionError."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", FAKE_KEY)

    def unreachable(location):
        raise ConnectionError(f"Max retries exceeded with url: /?api_key={FAKE_KEY}")
    fake_roboflow(monkeypatch, unreachable)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(flow.FlowError) as error:
        flow.download_dataset(str(tmp_path / "empty"), "w", "p", 1)
    assert FAKE_KEY not in str(error.value) and "api_key=***" in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__
