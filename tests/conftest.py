import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune_paligemma2.py")
sys.path.insert(0, ROOT)
from paligemma_json.json_text import jsonl_rows  # noqa: E402 (after the path it is found by)
# Tests never reach for the Hub: a Hub id fails at once instead of retrying for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"


def missing_check(reason: str):
    """A check that cannot run here: skipped on a laptop, saying so; a failure where `.ci/run` set
    REQUIRE_FULL_CHECKS=1, so CI never passes with it silently unchecked."""
    if os.environ.get("REQUIRE_FULL_CHECKS") == "1":
        pytest.fail(f"{reason} (REQUIRE_FULL_CHECKS=1: this check must run here)", pytrace=False)
    pytest.skip(reason)


def run_script(*args, env=None, cwd=None, timeout=600):
    """The script as a user runs it; output captured for the assertions."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=timeout)


def build_trainer(flow, model, processor, splits, generation, output_dir, **settings):
    """The script's trainer on the splits, with step 1's settings but those given (lower case)."""
    given = {name.upper(): value for name, value in settings.items()}
    return flow.build_trainer(model, processor, splits["train"], splits["valid"], generation,
                              flow.training_arguments(output_dir, generation, {**flow.DEFAULTS, **given}))


def run_flow(monkeypatch, *args) -> dict:
    """`python finetune_paligemma2.py ARGS`, run in this process: every step of the flow as the
    script runs it, without a new interpreter and a second torch start-up. Returns the script's
    globals (`trainer`, `metrics`, ...). A FlowError is raised, not printed."""
    import runpy

    from paligemma_json import settings
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its own
    monkeypatch.setattr(settings, "in_notebook", lambda: False)  # an imported ipykernel would hide the flags
    return runpy.run_path(SCRIPT, run_name="__main__")


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


def read_jsonl(path):
    return [row for _, row in jsonl_rows(str(path), "the run wrote a broken line")]


@pytest.fixture(scope="session")
def small_export(demo_assets, tmp_path_factory):
    """A few rows of the demo export per split, for the tests that train a handful of steps."""
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
