"""The fixtures every test module may ask for: the demo's assets and its one shared run, small
exports, the demo model's processor and splits, a browser. Functions a test calls are in helpers.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, missing_check, run_script, short_run_args

sys.path.insert(0, ROOT)  # the script and its package, for every test module
# Tests never reach for the Hub: a Hub id fails at once instead of retrying for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's synthetic export and tiny model, built once: (dataset_dir, model_dir)."""
    from paligemma_json.demo import build_demo
    dataset_dir, model_dir = build_demo(str(tmp_path_factory.mktemp("assets")), seed=0)
    return dataset_dir, model_dir


DEMO_TIMEOUT = 900  # seconds; the demo takes about one minute alone on 2 cores, far more on a loaded machine


@pytest.fixture(scope="session")
def demo_outcome(tmp_path_factory):
    """One whole `--demo` run for the session: (output_dir, result), or the line that says it was
    stopped at its cap."""
    output_dir = str(tmp_path_factory.mktemp("demo") / "out")
    try:
        # One thread, as the README's measured table: at two, OpenMP's sums vary from run to run, and the
        # demo's valid-JSON share at seed 42 with them (19 and 20 of 24 in two runs on one machine).
        return {"run": (output_dir, run_script("--demo", "--output-dir", output_dir, env={"OMP_NUM_THREADS": "1"},
                                               timeout=DEMO_TIMEOUT))}
    except subprocess.TimeoutExpired as timeout:
        printed = timeout.stdout or b""  # bytes whatever `text` says, or None
        printed = (printed.decode(errors="replace") if isinstance(printed, bytes) else printed).strip().splitlines()
        return {"timeout": f"the --demo run was stopped at its {DEMO_TIMEOUT} s cap (DEMO_TIMEOUT in "
                           f"tests/conftest.py); is the machine loaded? Its last line: "
                           f"{printed[-1][:200] if printed else '(nothing printed)'}"}


@pytest.fixture
def demo_run(demo_outcome):
    """The shared `--demo` run, for every end-to-end assertion. Past its cap, the first test that
    needs it fails saying so, in one line, and the others skip, pointing at it."""
    if "timeout" in demo_outcome:
        if not demo_outcome.get("reported"):
            demo_outcome["reported"] = True
            pytest.fail(demo_outcome["timeout"], pytrace=False)
        pytest.skip("the --demo run timed out: the first test that needed it failed, saying so")
    return demo_outcome["run"]


@pytest.fixture
def run(demo_run):
    """The shared `--demo` run, asserted to have finished: (output_dir, result)."""
    output_dir, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


@pytest.fixture(scope="session")
def small_export(demo_assets, tmp_path_factory):
    """A few rows of the demo export per split, for the tests that train a handful of steps."""
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


@pytest.fixture
def export(demo_assets, tmp_path):
    """A private copy of the demo export that a test may break."""
    dataset_dir = str(tmp_path / "export")
    shutil.copytree(demo_assets[0], dataset_dir)
    return dataset_dir


@pytest.fixture(scope="module")
def untrained(demo_assets):
    """The demo's random tiny model and its processor: left to itself it writes `<locNNNN>` tokens, not JSON."""
    import finetune_paligemma2 as flow
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    return model, flow.load_processor(demo_assets[1])


@pytest.fixture(scope="session")
def lora_run(demo_assets, small_export, tmp_path_factory):
    """A short LoRA run whose adapter has moved far from zero (lr 1e-2): the merge, the push and the
    LoRA card are checked on it."""
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run_script(*short_run_args(small_export, demo_assets[1], output_dir, "--use-lora",
                                        "--learning-rate", "1e-2", "--max-steps", "8", "--save-steps", "4"))
    assert result.returncode == 0, result.stderr[-2000:]
    return str(output_dir)


@pytest.fixture(scope="module")
def processor(demo_assets):
    """The demo model's processor."""
    import finetune_paligemma2 as flow
    return flow.load_processor(demo_assets[1])


@pytest.fixture(scope="module")
def splits(demo_assets):
    """The demo export's three splits, with the script's prompt."""
    import finetune_paligemma2 as flow
    return flow.load_splits(demo_assets[0], prompt="extract data in JSON format")


@pytest.fixture
def scripted_validation_f1(monkeypatch):
    """Call it with field F1 figures: the Trainer's validation passes report them in turn, every other
    figure as scored. The test set's scoring is left alone."""
    from paligemma_json import metrics, training

    def script(scores):
        scores, real = iter(scores), metrics.compute_metrics

        def scripted(rows, *args, **kwargs):  # the validation pass's figures, with a chosen field F1
            return {**real(rows, *args, **kwargs), "field_f1": next(scores)}
        monkeypatch.setattr(training, "compute_metrics", scripted)  # the Trainer's validation scoring alone
    return script


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, driven by playwright. Requested before the demo run, so a missing browser
    is reported at once."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing_check("CHROMIUM NOT INSTALLED: report.html was not rendered (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing_check("PLAYWRIGHT NOT INSTALLED: report.html was not rendered (pip install playwright)")
    return path
