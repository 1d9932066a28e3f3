import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune_paligemma2.py")
sys.path.insert(0, ROOT)
# Tests never reach for the Hub: a Hub id fails at once instead of retrying for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"


def run_script(*args, env=None, cwd=None):
    """The script as a user runs it; output captured for the assertions."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=600)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's synthetic export and tiny model, built once: (dataset_dir, model_dir)."""
    from paligemma_json.demo import build_demo
    dataset_dir, model_dir = build_demo(str(tmp_path_factory.mktemp("assets")), seed=0)
    return dataset_dir, model_dir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One whole `--demo` run, shared by every end-to-end assertion."""
    output_dir = str(tmp_path_factory.mktemp("demo") / "out")
    result = run_script("--demo", "--output-dir", output_dir)
    return output_dir, result


@pytest.fixture(scope="session")
def small_export(demo_assets, tmp_path_factory):
    """A few rows of the demo export per split, for the tests that train a handful of steps."""
    import json
    import shutil
    target = tmp_path_factory.mktemp("small") / "export"
    for split, count in {"train": 32, "valid": 8, "test": 8}.items():
        (target / split).mkdir(parents=True)
        source = os.path.join(demo_assets[0], split)
        rows = open(os.path.join(source, "annotations.jsonl")).readlines()[:count]
        (target / split / "annotations.jsonl").write_text("".join(rows))
        for row in rows:
            name = json.loads(row)["image"]
            shutil.copy(os.path.join(source, name), target / split / name)
    return str(target)


def short_run_args(dataset_dir, model_dir, output_dir, *extra):
    """A short full fine-tune of the tiny model: 8 steps an epoch, a checkpoint every 8."""
    return ["--dataset-dir", dataset_dir, "--model-id", model_dir, "--output-dir", str(output_dir),
            "--no-use-lora", "--learning-rate", "2e-3", "--batch-size", "4", "--grad-accum", "1",
            "--warmup-steps", "0", "--max-steps", "24", "--save-steps", "8", "--logging-steps", "1",
            "--max-new-tokens", "40", "--eval-batch-size", "8", "--seed", "3", *extra]
