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
    dataset_dir, model_dir, _ = build_demo(str(tmp_path_factory.mktemp("assets")), seed=0)
    return dataset_dir, model_dir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One whole `--demo` run, shared by every end-to-end assertion."""
    output_dir = str(tmp_path_factory.mktemp("demo") / "out")
    result = run_script("--demo", "--output-dir", output_dir)
    return output_dir, result
