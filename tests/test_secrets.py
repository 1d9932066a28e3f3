"""Secrets never reach stdout, stderr or any file a run writes."""

import hashlib
import json
import os

from helpers import assert_card_figures_match, card_header, run_script, short_run_args

FAKE_ROBOFLOW_KEY = "rf-FAKE-KEY-7c1d9e2b4a"
FAKE_HF_TOKEN = "hf_FAKETOKENq8w7e6r5t4y3"
FAKE_WANDB_KEY = "wandb-FAKE-KEY-0b9f8e7d6c5a4f3e2d1c"

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

# A stand-in for the `wandb` package (Weights & Biases is large and phones home): just what
# transformers' own WandbCallback calls. Like the real client it reads WANDB_API_KEY from the
# environment; it records the key's hash, and what would be uploaded (the run's config and every
# logged name), so the test can search that too.
FAKE_WANDB = '''
import hashlib, json, os

run = None

class _Config(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)

class _Run:
    id = name = "fake-run"
    def __init__(self):
        self.summary = {}
    def _label(self, **kwargs):
        pass

config = _Config()

def _record(**entry):
    with open(os.environ["FAKE_WANDB_RECORD"], "a") as out:
        out.write(json.dumps(entry, default=repr) + "\\n")

def init(project=None, **kwargs):
    global run
    run = _Run()
    _record(key_sha256=hashlib.sha256(os.environ["WANDB_API_KEY"].encode()).hexdigest(), project=project)
    return run

def log(values, **kwargs):
    _record(logged=sorted(values), config=config)

def define_metric(*args, **kwargs):
    pass

def termwarn(*args, **kwargs):
    pass

def finish():
    pass
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
        if path == "/api/validate-yaml":  # asked before a README.md is uploaded; the real Hub checks its header
            files = {"README.md": hashlib.sha256(json.loads(request.content)["content"].encode()).hexdigest()}
            response = {"errors": [], "warnings": []}
        elif path == "/api/repos/create":
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
    (stub / "wandb" / "sdk" / "lib").mkdir(parents=True)
    (stub / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    for package in ("sdk", "sdk/lib"):
        (stub / "wandb" / package / "__init__.py").write_text("")
    (stub / "wandb" / "sdk" / "lib" / "config_util.py").write_text("class ConfigError(Exception):\n    pass\n")
    record, dataset_dir, output_dir = tmp_path / "record", tmp_path / "download", tmp_path / "out"
    hub_record, wandb_record = tmp_path / "hub-record", tmp_path / "wandb-record"
    env = {"ROBOFLOW_API_KEY": FAKE_ROBOFLOW_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "PYTHONPATH": str(stub),
           "FAKE_ROBOFLOW_SOURCE": small_export, "FAKE_ROBOFLOW_RECORD": str(record),
           "FAKE_HUB_RECORD": str(hub_record), "WANDB_API_KEY": FAKE_WANDB_KEY, "FAKE_WANDB_RECORD": str(wandb_record)}
    result = run_script(*short_run_args(str(dataset_dir), demo_assets[1], output_dir, "--max-steps", "8",
                                        "--save-steps", "4", "--push-to-hub", "someone/pallet-model",
                                        "--report-to", "wandb,tensorboard"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert record.read_text() == hashlib.sha256(FAKE_ROBOFLOW_KEY.encode()).hexdigest()  # the real path ran

    # transformers' WandbCallback drove the stand-in tracker: it read its key, and got the validation figures.
    tracked = [json.loads(line) for line in wandb_record.read_text().splitlines()]
    assert tracked[0]["key_sha256"] == hashlib.sha256(FAKE_WANDB_KEY.encode()).hexdigest()
    assert any("eval/field_f1" in entry.get("logged", []) for entry in tracked)

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
    # Pushed after scoring: the card it uploaded, and had the Hub check first, holds the test figures.
    card = (final / "README.md").read_text()
    checked = [r["files"] for r in requests if r["path"] == "/api/validate-yaml"]
    assert checked == [{"README.md": hashlib.sha256(card.encode()).hexdigest()}]
    assert_card_figures_match(card, json.load(open(output_dir / "metrics.json")))
    assert card_header(card)["training_data"] == "roboflow:roboflow-jvuqo/pallet-load-manifest-json/2"
    assert (output_dir / "final").is_dir() and (output_dir / "metrics.json").is_file()
    assert list((output_dir / "runs").rglob("events.out.tfevents.*"))
    assert list(output_dir.glob("checkpoint-*/training_args.bin"))  # pickled arguments, searched too
    secrets = (FAKE_ROBOFLOW_KEY, FAKE_HF_TOKEN, FAKE_WANDB_KEY)
    settings_line = [line for line in result.stdout.splitlines() if line.startswith("settings: ")]
    assert len(settings_line) == 1 and "REPORT_TO=['wandb,tensorboard']" in settings_line[0]
    for secret in secrets:
        assert secret not in result.stdout and secret not in result.stderr
        assert secret not in wandb_record.read_text()  # nor in what would have been uploaded
    assert "pushed: " in result.stdout and "Bearer ***" in result.stderr  # the failure was masked, not hidden
    assert files_containing(output_dir, secrets) == []
    assert files_containing(dataset_dir, secrets) == []

