"""The whole `--demo` run, end to end: what lands in OUTPUT_DIR and whether the tiny model learnt JSON."""

import glob
import json
import math
import os
import re

import pytest

from paligemma_json.demo import DEMO_OVERRIDES, TINY_MODEL_SIZE, demo_figures_meaning
from paligemma_json.json_text import parse_json
from paligemma_json.metrics import compute_metrics
from helpers import loads, read_jsonl

DEMO_STEPS = DEMO_OVERRIDES["MAX_STEPS"]  # evaluated and saved every 100


@pytest.fixture
def metrics(run):
    """The demo run's metrics.json."""
    return json.load(open(os.path.join(run[0], "metrics.json")))


@pytest.fixture
def rows(run):
    """The demo run's predictions.jsonl."""
    return read_jsonl(os.path.join(run[0], "predictions.jsonl"))


def test_every_test_image_is_predicted_once_with_its_label(run, rows):
    output_dir, _ = run
    truth = read_jsonl(os.path.join(output_dir, "demo-dataset", "test", "annotations.jsonl"))
    assert [row["image"] for row in rows] == [row["image"] for row in truth]
    assert [row["suffix"] for row in rows] == [row["suffix"] for row in truth]
    assert {row["prefix"] for row in rows} == {"extract data in JSON format"}
    assert all(os.path.isfile(row["image_path"]) for row in rows)
    assert all("extract data" not in row["prediction"] for row in rows)  # the prompt is sliced off


def test_the_tiny_model_learnt_to_emit_valid_json(run, metrics, rows):
    output_dir, _ = run
    chosen = json.load(open(os.path.join(output_dir, "final", "confidence.json")))  # tests/test_confidence.py
    assert metrics == compute_metrics(rows, json.load(open(os.path.join(output_dir, "schema.json"))),
                                      chosen["threshold"], chosen["source"])
    assert {"json_valid_rate", "schema_valid_rate", "duplicate_key_rate", "truncated_rate", "exact_match", "field_precision", "field_recall", "field_f1", "ted_accuracy",
            "char_similarity", "anls_star", "rows_without_json_target", "per_field"} <= set(metrics)
    assert [k for k, v in metrics.items() if not isinstance(v, (int, float, type(None)))] == [
        "decoding", "confidence_threshold_source", "per_field"]
    assert set(metrics["per_field"]) >= {"route", "products.description", "total_cases"}
    # Constrained by default: every prediction parses and fits the schema, by construction. The raw
    # model's own learning signal is the free decoding's, kept beside it.
    assert metrics["decoding"] == "constrained"
    assert metrics["json_valid_rate"] == 1.0 and metrics["schema_valid_rate"] == 1.0
    assert metrics["rows"] == 24 and metrics["free_json_valid_rate"] >= 0.8
    assert {"free_field_f1", "free_schema_valid_rate", "confident_field_accuracy", "wrong_fields_flagged"} <= set(metrics)
    assert all(0 <= field["confidence"] <= 1 for row in rows for field in row["confidence"])
    # Confidence means something even here: the few fields it is sure of are right more often.
    assert metrics["confident_field_accuracy"] > metrics["unsure_field_accuracy"]
    # It learnt the manifest's shape, not just brackets: keys in the labels' order, unconstrained.
    parsed = [parse_json(row["free_prediction"]) for row in rows]
    keys = list(json.loads(rows[0]["suffix"]))
    assert sum(isinstance(p, dict) and list(p) == keys for p in parsed) >= 0.8 * len(rows)


def test_the_figures_count_what_the_predictions_hold(metrics, rows):
    """The figures in metrics.json, counted again by hand from predictions.jsonl."""
    truths = [json.loads(row["suffix"]) for row in rows]
    held, free = [loads(row["prediction"]) for row in rows], [loads(row["free_prediction"]) for row in rows]
    assert metrics["rows"] == 24 and metrics["rows_without_json_target"] == 0
    assert metrics["free_json_valid_rate"] == sum(isinstance(p, (dict, list)) for p in free) / 24
    assert metrics["exact_match"] == sum(p == t for p, t in zip(held, truths)) / 24
    assert metrics["free_exact_match"] == sum(p == t for p, t in zip(free, truths)) / 24
    assert metrics["truncated_rate"] == sum(row["truncated"] for row in rows) / 24
    route = metrics["per_field"]["route"]  # one route per manifest, scored on its stripped text
    assert route["support"] == 24 and route["predicted"] == sum("route" in p for p in held)
    assert route["correct"] == sum(str(p.get("route", "")).strip() == t["route"].strip() for p, t in zip(held, truths))
    descriptions = metrics["per_field"]["products.description"]
    assert descriptions["support"] == sum(len(t["products"]) for t in truths)
    assert route["accuracy"] == route["correct"] / 24


def test_final_model_and_processor_are_safetensors_that_load_back(run):
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    final = os.path.join(run[0], "final")
    assert os.path.isfile(os.path.join(final, "model.safetensors"))
    assert not glob.glob(os.path.join(final, "*.bin")) and not glob.glob(os.path.join(final, "*.pt"))
    PaliGemmaForConditionalGeneration.from_pretrained(final)
    PaliGemmaProcessor.from_pretrained(final)
    assert not os.path.exists(final + ".tmp")


def test_best_checkpoint_is_chosen_by_validation_field_f1(run):
    output_dir, result = run
    checkpoints = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")))
    assert 1 <= len(checkpoints) <= 2
    state = json.load(open(os.path.join(checkpoints[-1], "trainer_state.json")))
    assert state["best_model_checkpoint"] in checkpoints
    evals = [(entry["step"], entry["eval_field_f1"]) for entry in state["log_history"] if "eval_field_f1" in entry]
    assert [step for step, _ in evals] == list(range(100, DEMO_STEPS + 1, 100))
    best = max(f1 for _, f1 in evals)
    assert state["best_metric"] == best
    assert state["best_global_step"] == min(step for step, f1 in evals if f1 == best)  # a tie keeps the earlier
    assert f"(step {state['best_global_step']}, validation field_f1 {best:.4f})" in result.stdout


def test_tensorboard_has_a_loss_curve(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = glob.glob(os.path.join(run[0], "runs", "*", "events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(os.path.dirname(events[0]))
    accumulator.Reload()
    evaluations = DEMO_STEPS // 100
    assert len(accumulator.Scalars("train/loss")) >= 20 and len(accumulator.Scalars("eval/loss")) == evaluations
    assert len(accumulator.Scalars("eval/field_f1")) == evaluations
    assert len(accumulator.Scalars("eval/json_valid_rate")) == evaluations


def test_the_run_says_what_it_did(run):
    _, result = run
    assert "demo: overriding USE_LORA=False" in result.stdout
    trainable, total = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", result.stdout).groups()
    assert trainable == total  # the demo fine-tunes fully
    line = re.search(rf"^training: {DEMO_STEPS} steps in (\d+) s \((\d+) s of it validation\); the steps alone: "
                     r"([\d.]+) samples/s, \d+ tokens/s", result.stdout, re.M)
    runtime, validation, samples_per_second = int(line[1]), int(line[2]), float(line[3])
    # Steps of 8: the rate leaves out the validations (loss and generation on `valid`).
    assert 0 < validation < runtime
    assert samples_per_second == pytest.approx(DEMO_STEPS * 8 / (runtime - validation), rel=0.15)
    assert re.search(r"^json_valid_rate +[01]\.\d{3}$", result.stdout, re.M)
    assert "Traceback" not in result.stderr


def test_the_run_says_what_its_figures_mean(run, metrics):
    """Right after the metrics table, one line: low figures are what a tiny model at 64 px gives."""
    _, result = run
    line = demo_figures_meaning(metrics)
    printed = result.stdout.splitlines()
    table_written = next(number for number, text in enumerate(printed) if text.startswith("written: "))
    assert line in printed[table_written + 1:]


def test_what_the_figures_mean_is_one_line_from_the_metrics():
    fields = {"copy": {"correct": 23, "support": 24}, "route": {"correct": 0, "support": 24},
              "products.cases": {"correct": 2, "support": 72}}
    line = demo_figures_meaning({"field_f1": 0.1512, "per_field": fields})
    assert line.startswith(f"demo: a field F1 of 0.151, with 1 of 3 fields never right, is what a {TINY_MODEL_SIZE}-"
                           "parameter model trained from random weights gives on 64 px pages")
    assert "(`copy`, right on 23 of 24 pages)" in line and "\n" not in line
    assert line.endswith("(docs/demo.md)")
    assert os.path.isfile(os.path.join(os.path.dirname(__file__), "..", "docs", "demo.md"))


def test_the_tiny_models_size_is_the_one_the_line_quotes(demo_assets):
    from safetensors import safe_open
    with safe_open(os.path.join(demo_assets[1], "model.safetensors"), "pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert f"{parameters / 1e6:.2f}M" == TINY_MODEL_SIZE


def test_the_pictures_are_drawn(run):
    from PIL import Image
    for name, minimum in [("predictions.png", (1200, 800)), ("training_curves.png", (800, 300))]:
        with Image.open(os.path.join(run[0], name)) as picture:
            assert picture.format == "PNG" and picture.size >= minimum


def test_the_metrics_table_is_printed(run, metrics):
    """Just before the `written:` line: every figure of metrics.json in its order, to three places, then
    the fields worst first (at most 15), each with its accuracy, correct, support and predicted."""
    _, result = run
    assert "field (worst first)" in result.stdout and "ted_accuracy" in result.stdout
    overall = {name: value for name, value in metrics.items() if name != "per_field"}
    fields = list(metrics["per_field"].items())
    expected = [["metric", "value"]]
    expected += [[name, f"{value:.3f}" if isinstance(value, float) else str(value)] for name, value in overall.items()]
    expected += [[], ["field", "(worst", "first)", "accuracy", "correct", "support", "predicted"]]
    expected += [[name, f"{field['accuracy']:.3f}", *map(str, (field["correct"], field["support"], field["predicted"]))]
                 for name, field in fields[:15]]
    if len(fields) > 15:
        expected.append(["...", "and", str(len(fields) - 15), "more", "fields", "in", "metrics.json"])
    printed = result.stdout.splitlines()
    written = next(number for number, text in enumerate(printed) if text.startswith("written: "))
    assert [line.split() for line in printed[written - len(expected):written]] == expected
    accuracies = [field["accuracy"] for _, field in fields]
    assert accuracies == sorted(accuracies)  # worst first


def test_the_predictions_picture_shows_what_the_model_reads_on_every_card(run):
    """The demo's model reads one field, `copy`; its cards have more fields than fit, errors first. Each
    drawn card whose `copy` is right names it among the right fields, whatever was cut."""
    from paligemma_json.metrics import score_rows
    from paligemma_json.pictures import CARD_HEIGHT, LINE, RIGHT, field_lines
    scored = score_rows([json.loads(line) for line in open(os.path.join(run[0], "predictions.jsonl"))])[:8]
    room = (CARD_HEIGHT - 2 * LINE - 4 - 30) // LINE  # as _draw_card lays a card out
    shown = 0
    for row in scored:
        lines = field_lines(row, 0.5, room)
        assert len(lines) <= room + 1
        right = " ".join(text for text, colour, _ in lines if colour == RIGHT)
        copy_right = any(status == "right" and key == "copy" for status, key, _, _ in row.statuses)
        assert ("copy" in right) == copy_right
        shown += copy_right
    assert shown >= 5  # the colour is read on at least 75% of test pages (test_reads_the_page.py)
