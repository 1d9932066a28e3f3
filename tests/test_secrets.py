"""Secrets never reach stdout, stderr or any file a run writes; QLoRA without bitsandbytes is one line."""

import hashlib
import json
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


# The Hugging Face Hub, stood in for at the HTTP layer (a sitecustomize on PYTHONPATH, so it is in
# place before the script starts): huggingface_hub's own client reads HF_TOKEN and sends the
# requests; this answers them, and records what it received, the token only by its hash. Its first
# upload request fails, quoting the token as a proxy's error might; the client retries it.
FAKE_HUB = '''
import base64, hashlib, json, os

if os.environ.get("FAKE_HUB_RECORD"):
    import httpx2
    import huggingface_hub

    def record(**entry):
        with open(os.environ["FAKE_HUB_RECORD"], "a") as out:
            out.write(json.dumps(entry) + "\\n")

    failed = []

    def answer(request):
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        path, seen = request.url.path, hashlib.sha256(token.encode()).hexdigest() if token else None
        if path.endswith("/preupload/main") and not failed:
            failed.append(path)
            record(path=path, token_sha256=seen, failed=True)
            raise httpx2.ConnectError(f"proxy refused {request.url} for Authorization: Bearer {token}")
        files = {}
        if path == "/api/repos/create":
            payload = json.loads(request.content)
            response = {"url": f"https://huggingface.co/{payload['organization']}/{payload['name']}"}
        elif path.endswith("/preupload/main"):
            response = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                  for f in json.loads(request.content)["files"]]}
        elif path.endswith("/commit/main"):
            for line in request.content.splitlines():
                operation = json.loads(line)
                if operation["key"] == "file":
                    content = base64.b64decode(operation["value"]["content"])
                    files[operation["value"]["path"]] = hashlib.sha256(content).hexdigest()
            response = {"commitUrl": "https://huggingface.co/c/1", "commitOid": "1" * 40, "pullRequestUrl": None}
        else:
            record(path=path, token_sha256=seen, failed=False)
            return httpx2.Response(404, json={"error": "not part of the stand-in"})
        record(path=path, token_sha256=seen, failed=False, files=files)
        return httpx2.Response(200, json=response)

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(answer)))
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
    (stub / "sitecustomize.py").write_text(FAKE_HUB)
    record, dataset_dir, output_dir = tmp_path / "record", tmp_path / "download", tmp_path / "out"
    hub_record = tmp_path / "hub-record"
    env = {"ROBOFLOW_API_KEY": FAKE_ROBOFLOW_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "PYTHONPATH": str(stub),
           "FAKE_ROBOFLOW_SOURCE": small_export, "FAKE_ROBOFLOW_RECORD": str(record),
           "FAKE_HUB_RECORD": str(hub_record)}
    result = run_script(*short_run_args(str(dataset_dir), demo_assets[1], output_dir, "--max-steps", "8",
                                        "--save-steps", "4", "--push-to-hub", "someone/pallet-model"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert record.read_text() == hashlib.sha256(FAKE_ROBOFLOW_KEY.encode()).hexdigest()  # the real path ran

    # The push used the token: every request that reached the stand-in Hub carried it, and the
    # one that failed quoting it was retried and masked in huggingface_hub's own warning.
    requests = [json.loads(line) for line in hub_record.read_text().splitlines()]
    repo = "/api/models/someone/pallet-model"
    pushed = [r for r in requests if r["path"] in ("/api/repos/create", f"{repo}/preupload/main", f"{repo}/commit/main")]
    assert [(r["path"].rsplit("/", 2)[-2], r["failed"]) for r in pushed] == [
        ("repos", False), ("preupload", True), ("preupload", False), ("commit", False)]
    assert {r["token_sha256"] for r in pushed} == {hashlib.sha256(FAKE_HF_TOKEN.encode()).hexdigest()}
    final = output_dir / "final"
    assert pushed[-1]["files"] == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                                   for path in final.iterdir()}  # final/, whole
    assert (output_dir / "final").is_dir() and (output_dir / "metrics.json").is_file()
    assert list((output_dir / "runs").rglob("events.out.tfevents.*"))
    assert list(output_dir.glob("checkpoint-*/training_args.bin"))  # pickled arguments, searched too
    for secret in (FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN):
        assert secret not in result.stdout and secret not in result.stderr
    assert "pushed: " in result.stdout and "Bearer ***" in result.stderr  # the failure was masked, not hidden
    assert files_containing(output_dir, [FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN]) == []
    assert files_containing(dataset_dir, [FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN]) == []


def test_qlora_where_bitsandbytes_cannot_load_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(flow.FlowError, match="USE_QLORA needs bitsandbytes, which cannot load here .*--no-use-qlora"):
        flow.quantization_config(flow.torch.float32)
