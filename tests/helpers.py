"""What several test modules share that is a function, not a fixture: running the script, reading what
it wrote, and checking a card or a page. Fixtures are in conftest.py, which pytest does not mean to be
imported; a test module imports these from here, never from another test module."""

import contextlib
import glob
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune_paligemma2.py")
PROMPT = "extract data in JSON format"  # the script's default


def missing_check(reason: str):
    """A check that cannot run here: skipped on a laptop, saying so; a failure where `.ci/run` set
    REQUIRE_FULL_CHECKS=1, so CI never passes with it silently unchecked."""
    if os.environ.get("REQUIRE_FULL_CHECKS") == "1":
        pytest.fail(f"{reason} (REQUIRE_FULL_CHECKS=1: this check must run here)", pytrace=False)
    pytest.skip(reason)


# --- Running the script ----------------------------------------------------------------------------

def run_script(*args, env=None, cwd=None, timeout=600):
    """The script as a user runs it; output captured for the assertions."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=timeout)


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


def short_run_args(dataset_dir, model_dir, output_dir, *extra):
    """A short full fine-tune of the tiny model: 8 steps an epoch, a checkpoint every 8."""
    return ["--dataset-dir", dataset_dir, "--model-id", model_dir, "--output-dir", str(output_dir),
            "--no-use-lora", "--learning-rate", "2e-3", "--batch-size", "4", "--grad-accum", "1",
            "--warmup-steps", "0", "--max-steps", "24", "--save-steps", "8", "--logging-steps", "1",
            "--max-new-tokens", "40", "--eval-batch-size", "8", "--seed", "3", *extra]


def build_trainer(flow, model, processor, splits, generation, output_dir, **settings):
    """The script's trainer on the splits, with step 1's settings but those given (lower case)."""
    given = {name.upper(): value for name, value in settings.items()}
    return flow.build_trainer(model, processor, splits["train"], splits["valid"], generation,
                              flow.training_arguments(output_dir, generation, {**flow.DEFAULTS, **given}))


# --- Several processes -----------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained_start_args(demo_run, small_export, output_dir):
    """A short full fine-tune that starts from the demo's trained model, so that validation scores
    something above zero and a share of the rows scores differently from the whole split."""
    return short_run_args(small_export, os.path.join(demo_run[0], "final"), output_dir, "--epochs", "1",
                          "--max-steps", "-1", "--learning-rate", "1e-4", "--max-new-tokens", "220")


def assert_validation_equals_one_process(output_dir, small_export, step=4):
    """The field F1 and valid-JSON rate that the launched run logged at `step` are what this one
    process gets from that checkpoint, generating the whole validation split itself."""
    import torch

    import finetune_paligemma2 as flow
    from paligemma_json.metrics import compute_metrics
    checkpoint = output_dir / f"checkpoint-{step}"
    logged = next(entry for entry in json.load(open(checkpoint / "trainer_state.json"))["log_history"]
                  if "eval_field_f1" in entry and entry["step"] == step)
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(checkpoint).eval()
    valid = flow.load_splits(small_export, "extract data in JSON format")["valid"]
    rows = list(flow.predict_rows(model, flow.load_processor(str(checkpoint)), valid,
                                  flow.GenerationSettings(torch.float32, max_new_tokens=220), with_confidence=False))
    scores = compute_metrics(rows)
    assert 0 < scores["field_f1"] < 1  # not a figure that any share of the rows would also give
    assert (logged["eval_field_f1"], logged["eval_json_valid_rate"]) == (scores["field_f1"], scores["json_valid_rate"])


# --- What a run wrote ------------------------------------------------------------------------------

def read_jsonl(path):
    from paligemma_json.json_text import jsonl_rows
    return [row for _, row in jsonl_rows(str(path), "the run wrote a broken line")]


def loads(text):
    """The JSON in `text`, or None where it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def weights(folder):
    """The one safetensors file of a saved model or adapter, loaded."""
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    assert len(files) == 1, files  # model.safetensors, or adapter_model.safetensors under LoRA
    return load_file(files[0])


def same(first, second):
    return first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def assert_final_holds_the_best(output_dir, best: str, last: str):
    """final/ holds the weights of the checkpoint folder `best`, not of the later `last`."""
    final, best, last = (weights(output_dir / name) for name in ("final", best, last))
    assert not same(best, last)  # training moved the weights after the best, so this could fail
    assert same(final, best)


def new_documents(folder, count=2, seed=7) -> list[dict]:
    """Photos no split holds, with their corrected labels, exported as a review page writes them."""
    from paligemma_json.demo import make_manifest, render_manifest
    os.makedirs(folder, exist_ok=True)
    rng, rows = random.Random(seed), []
    for index in range(count):
        record = make_manifest(rng)
        render_manifest(record, rng).save(os.path.join(folder, f"new-{index}.jpg"), quality=90)
        rows.append({"image": f"new-{index}.jpg", "prefix": PROMPT, "suffix": json.dumps(record)})
    return rows


# --- The model card --------------------------------------------------------------------------------

def card_header(card: str) -> dict:
    """The part between the two `---` lines, read back with a YAML parser."""
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def card_figures(card: str) -> dict:
    """Every `key` value pair in the card's test figures table."""
    section = card.split("\n## Test figures\n", 1)[1].split("\n## ", 1)[0]
    return {key: json.loads(value) for key, value in re.findall(r"`(\w+)` (\S+) \|", section)}


def assert_card_figures_match(card: str, metrics: dict) -> None:
    from paligemma_json import model_card
    figures = card_figures(card)
    expected = [key for _, key in model_card.FIGURES if key in metrics]
    if metrics["decoding"] == "constrained":
        expected += [f"free_{key}" for key in expected if f"free_{key}" in metrics]
    assert {"json_valid_rate", "field_f1"} <= set(figures)
    assert sorted(figures) == sorted(expected) and figures == {key: metrics[key] for key in expected}


def run_card_code(card: str, image_path: str) -> str:
    """The card's Python block, run as written but on `image_path`: what it prints."""
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"document.jpg"' in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace('"document.jpg"', repr(image_path)), {})
    return printed.getvalue().strip()


def free_prediction(row: dict) -> str:
    return row.get("free_prediction", row["prediction"])


# --- The pages: report.html and review.html --------------------------------------------------------

class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.scripts, self.in_script = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.attributes += attrs
        self.in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")

    def handle_data(self, data):
        if self.in_script:
            self.scripts[-1] += data

    def handle_endtag(self, tag):
        self.in_script = False


def launch_chromium(playwright, executable):
    """Headless chromium that reaches for nothing of its own (updates, sync, QUIC), so that any
    request a page makes is the page's."""
    return playwright.chromium.launch(executable_path=executable, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def collect_problems(page, local=("file:", "data:")) -> list[str]:
    """The list that every console error, page error and request for anything but a `local` URL
    is added to, as the page runs."""
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: None if request.url.startswith(local)
            else problems.append(f"fetched {request.url}"))
    return problems
