"""The whole `--demo` run, end to end: what lands in OUTPUT_DIR and whether the tiny model learnt JSON."""

import glob
import json
import os
import re

import pytest

from paligemma_json.metrics import compute_metrics, parse_json


@pytest.fixture(scope="module")
def run(demo_run):
    output_dir, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_every_test_image_is_predicted_once_with_its_label(run):
    output_dir, _ = run
    rows = read_jsonl(os.path.join(output_dir, "predictions.jsonl"))
    truth = read_jsonl(os.path.join(output_dir, "demo-dataset", "test", "annotations.jsonl"))
    assert [row["image"] for row in rows] == [row["image"] for row in truth]
    assert [row["suffix"] for row in rows] == [row["suffix"] for row in truth]
    assert {row["prefix"] for row in rows} == {"extract data in JSON format"}
    assert all(os.path.isfile(row["image_path"]) for row in rows)
    assert all("extract data" not in row["prediction"] for row in rows)  # the prompt is sliced off


def test_the_tiny_model_learnt_to_emit_valid_json(run):
    output_dir, _ = run
    metrics = json.load(open(os.path.join(output_dir, "metrics.json")))
    rows = read_jsonl(os.path.join(output_dir, "predictions.jsonl"))
    assert metrics == compute_metrics(rows)
    assert metrics["rows"] == 24 and metrics["json_valid_rate"] >= 0.8
    # It learnt the manifest's shape, not just brackets: keys in the labels' order.
    parsed = [parse_json(row["prediction"]) for row in rows]
    keys = list(json.loads(rows[0]["suffix"]))
    assert sum(isinstance(p, dict) and list(p) == keys for p in parsed) >= 0.8 * len(rows)


def test_final_model_and_processor_are_safetensors_that_load_back(run):
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    final = os.path.join(run[0], "final")
    assert os.path.isfile(os.path.join(final, "model.safetensors"))
    assert not glob.glob(os.path.join(final, "*.bin")) and not glob.glob(os.path.join(final, "*.pt"))
    PaliGemmaForConditionalGeneration.from_pretrained(final)
    PaliGemmaProcessor.from_pretrained(final)
    assert not os.path.exists(final + ".tmp")


def test_best_checkpoint_is_kept_and_used(run):
    output_dir, result = run
    checkpoints = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")))
    assert 1 <= len(checkpoints) <= 2
    state = json.load(open(os.path.join(checkpoints[-1], "trainer_state.json")))
    assert state["best_model_checkpoint"] in checkpoints
    assert f"best checkpoint: {state['best_model_checkpoint']}" in result.stdout
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 4 and state["best_metric"] == min(evals)  # every 100 of 400 steps


def test_tensorboard_has_a_loss_curve(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = glob.glob(os.path.join(run[0], "runs", "*", "events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) >= 20 and accumulator.Scalars("eval/loss")


def test_the_run_says_what_it_did(run):
    _, result = run
    assert "demo: overriding USE_LORA=False" in result.stdout
    trainable, total = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", result.stdout).groups()
    assert trainable == total  # the demo fine-tunes fully
    assert "samples/s" in result.stdout and "json_valid_rate=" in result.stdout
    assert "Traceback" not in result.stderr
