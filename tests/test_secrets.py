"""Secrets never reach stdout, stderr or any file a run writes; QLoRA without bitsandbytes is one line."""

import hashlib
import os
import sys

import pytest

import finetune_paligemma2 as flow
from conftest import run_script, short_run_args

FAKE_ROBOFLOW_KEY = "rf-FAKE-KEY-7c1d9e2b4a"
FAKE_HF_TOKEN = "hf_FAKETOKENq8w7e6r5t4y3"

# A stand-in for the `roboflow` package, found first on PYTHONPATH: it takes the key as the real
# client does, proves it got it (by a hash, never the key), and "downloads" a local export.
FAKE_ROBOFLOW = '''
import hashlib, os, shutil

class Roboflow:
    def __init__(self, api_key):
        with open(os.environ["FAKE_ROBOFLOW_RECORD"], "w") as record:
            record.write(hashlib.sha256(api_key.encode()).hexdigest())
    def workspace(self, name):
        return self
    def project(self, name):
        return self
    def version(self, number):
        return self
    def download(self, model_format, location=None, overwrite=False):
        assert model_format == "jsonl"
        shutil.copytree(os.environ["FAKE_ROBOFLOW_SOURCE"], location)
'''


def files_containing(folder, secrets):
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            data = open(os.path.join(root, name), "rb").read()
            found += [(os.path.join(root, name), s) for s in secrets if s.encode() in data]
    return found


def test_no_secret_in_any_output(demo_assets, small_export, tmp_path):
    stub = tmp_path / "stub"
    (stub / "roboflow").mkdir(parents=True)
    (stub / "roboflow" / "__init__.py").write_text(FAKE_ROBOFLOW)
    record, dataset_dir, output_dir = tmp_path / "record", tmp_path / "download", tmp_path / "out"
    env = {"ROBOFLOW_API_KEY": FAKE_ROBOFLOW_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "PYTHONPATH": str(stub),
           "FAKE_ROBOFLOW_SOURCE": small_export, "FAKE_ROBOFLOW_RECORD": str(record)}
    result = run_script(*short_run_args(str(dataset_dir), demo_assets[1], output_dir, "--max-steps", "8",
                                        "--save-steps", "4"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert record.read_text() == hashlib.sha256(FAKE_ROBOFLOW_KEY.encode()).hexdigest()  # the real path ran
    assert (output_dir / "final").is_dir() and (output_dir / "metrics.json").is_file()
    assert list((output_dir / "runs").rglob("events.out.tfevents.*"))
    assert list(output_dir.glob("checkpoint-*/training_args.bin"))  # pickled arguments, searched too
    for secret in (FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN):
        assert secret not in result.stdout and secret not in result.stderr
    assert files_containing(output_dir, [FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN]) == []
    assert files_containing(dataset_dir, [FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN]) == []


def test_qlora_where_bitsandbytes_cannot_load_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(flow.FlowError, match="USE_QLORA needs bitsandbytes, which cannot load here .*--no-use-qlora"):
        flow.quantization_config(flow.torch.float32)
