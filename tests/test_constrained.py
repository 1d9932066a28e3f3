"""Constrained decoding (llguidance, held to the labels' schema) and per-field confidence."""

import json
import os
import random

import pytest
import torch
from jsonschema import Draft202012Validator

import finetune_paligemma2 as flow
from paligemma_json.constrained import (chosen_token_probabilities, compile_schema, field_confidences, json_layout,
                                        leaf_spans, with_layout)
from paligemma_json.demo import make_manifest
from paligemma_json.metrics import compute_metrics, scored_confidences

PROMPT = "extract data in JSON format"


@pytest.fixture(scope="module")
def splits(demo_assets):
    return flow.load_splits(demo_assets[0], PROMPT)


@pytest.fixture(scope="module")
def schema(splits):
    return flow.label_schema(splits)


@pytest.fixture(scope="module")
def untrained(demo_assets):
    """The demo's random tiny model: left to itself it writes `<locNNNN>` tokens, not JSON."""
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    return model, flow.load_processor(demo_assets[1])


def generate_ids(model, processor, batch, constraint, max_new_tokens, num_beams=1):
    inputs = flow.collate_fn(batch, processor, torch.float32, with_labels=False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                logits_processor=[constraint.logits_processor()] if constraint else None)
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def test_layout_follows_the_labels_separators():
    data = {"a": [1, 2], "b": "x"}
    assert json_layout([json.dumps(data)])["item_separator"] == ", "
    assert json_layout([json.dumps(data, separators=(",", ":"))])["key_separator"] == ":"
    loose = json_layout([json.dumps(data, indent=2)])
    assert "whitespace_pattern" in loose and "{0,64}" in loose["whitespace_pattern"]  # bounded
    users = with_layout({"type": "object", "x-guidance": {"key_separator": " : "}}, [json.dumps(data)])
    assert users["x-guidance"]["key_separator"] == " : " and users["x-guidance"]["item_separator"] == ", "


def test_leaf_spans_find_every_value_with_donut_key_paths():
    text = '{"a": "x y", "n": -2.5, "items": [{"c": 3, "ok": true}, {"c": null}], "tags": ["p", "q"]}'
    leaves = leaf_spans(text)
    assert [(key, value) for key, value, _, _ in leaves] == [
        ("a", "x y"), ("n", -2.5), ("items.c", 3), ("items.ok", True), ("items.c", None), ("tags", "p"), ("tags", "q")]
    assert [text[start:end] for _, _, start, end in leaves][:3] == ['"x y"', "-2.5", "3"]
    assert leaf_spans('{"a": "x"') == [] and leaf_spans('{"a": 1} tail') == []


def test_an_untrained_model_under_the_constraint_writes_only_schema_valid_json(untrained, splits, schema):
    model, processor = untrained
    batch = [splits["test"][i] for i in range(4)]
    free = generate_ids(model, processor, batch, None, 40)
    special = set(processor.tokenizer.added_tokens_decoder) - {processor.tokenizer.eos_token_id}
    assert any(token in special for row in free for token in row)  # what the constraint is there to stop
    constraint = flow.build_constraint(schema, processor, model, constrained=True)
    for num_beams in (1, 2):  # beam search works under the constraint too
        rows = generate_ids(model, processor, batch, constraint, 1200, num_beams)
        eos = processor.tokenizer.eos_token_id
        for row in rows:
            assert eos in row, "the budget was large enough for a complete JSON"
            answer = row[:row.index(eos)]
            assert not special & set(answer)  # no <locNNNN>, <image>, <pad> inside values
            text = processor.tokenizer.decode(answer)
            assert Draft202012Validator(schema).is_valid(json.loads(text)), text


def test_the_mask_covers_padded_logits_and_a_complete_json_allows_only_eos(untrained, schema):
    model, processor = untrained
    constraint = flow.JsonSchemaConstraint(schema, processor.tokenizer)
    mask = constraint.logits_processor()
    prompt = torch.zeros((1, 3), dtype=torch.long)
    scores = mask(prompt, torch.zeros((1, len(processor.tokenizer) + 64)))
    allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
    assert [processor.tokenizer.convert_ids_to_tokens(i) for i in allowed] == ["{"]  # and no padded id
    mask = constraint.logits_processor()
    text = json.dumps(make_manifest(random.Random(5)))  # a label the schema was not inferred from
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    scores = torch.zeros((1, len(processor.tokenizer) + 64))
    for step in range(len(ids) + 1):
        out = mask(torch.tensor([[0, 0, 0] + ids[:step]]), scores.clone())
        if step < len(ids):
            assert torch.isfinite(out[0, ids[step]]), f"label token {step} was masked"
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [processor.tokenizer.eos_token_id]


def test_a_small_budget_is_flagged_truncated_under_the_constraint(untrained, splits, schema):
    model, processor = untrained
    constraint = flow.build_constraint(schema, processor, model, constrained=True)
    rows = flow.generate_batch(model, processor, [splits["test"][0]], torch.float32, 12, 1, constraint)
    assert rows[0]["truncated"] and flow.parse_json(rows[0]["prediction"]) is None
    assert compute_metrics([{**rows[0], "suffix": splits["test"].entries[0]["suffix"]}])["truncated_rate"] == 1.0


def test_field_confidences_take_the_least_likely_token_of_each_value(untrained):
    _, processor = untrained
    tokenizer = processor.tokenizer
    text = '{"route": "R12", "n": 7}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    probabilities = [0.9] * len(ids)
    ends = [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]
    inside_n = next(k for k, end in enumerate(ends) if end > text.index("7"))  # the token that writes 7
    probabilities[inside_n] = 0.3
    fields = field_confidences(ids, probabilities, tokenizer, text)
    assert [(f["field"], f["value"]) for f in fields] == [("route", "R12"), ("n", 7)]
    assert fields[0]["confidence"] == 0.9 and fields[1]["confidence"] == 0.3
    # Where a number stops counts too: an unsure `}` after 7 means 7 might have been 70.
    probabilities = [0.9] * len(ids)
    probabilities[-1] = 0.2
    assert [f["confidence"] for f in field_confidences(ids, probabilities, tokenizer, text)] == [0.9, 0.2]
    assert field_confidences(ids[:-1], probabilities[:-1], tokenizer, text[:-1]) == []  # not JSON: no fields


def test_confidence_under_beam_search_is_the_models_own_probability(demo_run, splits):
    """beam_indices pick each step's logits row: check against a teacher-forced forward pass."""
    final = os.path.join(demo_run[0], "final")
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(final).eval()
    processor = flow.load_processor(final)
    inputs = flow.collate_fn([splits["test"][i] for i in range(2)], processor, torch.float32, with_labels=False)
    prompt = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=30, do_sample=False, num_beams=2, output_logits=True,
                                return_dict_in_generate=True)
        probabilities = chosen_token_probabilities(output, prompt)
        sequences = output.sequences
        answer = torch.ones_like(sequences[:, prompt:])  # attended causally, as a suffix (type 1)
        forced = model(input_ids=sequences, pixel_values=inputs["pixel_values"],
                       attention_mask=torch.cat([inputs["attention_mask"], answer], 1),
                       token_type_ids=torch.cat([inputs["token_type_ids"], answer], 1)).logits
    expected = torch.softmax(forced[:, prompt - 1:-1].float(), -1).gather(-1, sequences[:, prompt:, None])[..., 0]
    eos = processor.tokenizer.eos_token_id
    for row in range(2):
        length = (sequences[row, prompt:] == eos).nonzero().flatten()
        length = int(length[0]) + 1 if len(length) else sequences.shape[1] - prompt
        assert probabilities[row, :length] == pytest.approx(expected[row, :length], abs=1e-3)


def test_a_schema_the_grammar_cannot_use_stops_in_one_line():
    with pytest.raises(flow.FlowError, match="the schema cannot constrain generation .*--no-constrained"):
        compile_schema({"type": "foo"})


def test_only_the_values_donut_scores_get_a_confidence_mark():
    row = {"prediction": '{"a": [0, 1, true, "x"], "b": "  ", "c": 2.50}',
           "confidence": [{"field": "a", "value": v, "confidence": 0.5} for v in (0, 1, True, "x")]
           + [{"field": "b", "value": "  ", "confidence": 0.5}, {"field": "c", "value": 2.5, "confidence": 0.5}]}
    assert [(key, value) for key, value, _ in scored_confidences(row)] == [
        ("a", "0"), ("a", "1"), ("a", "x"), ("b", ""), ("c", "2.5")]  # Donut drops the true in a list


def test_confidence_is_lower_on_a_corrupted_model(demo_run, splits):
    """The trained demo model against its language model drowned in noise (twice each weight
    tensor's spread). Milder noise (0.5 or 1 spread) left the mean confidence where it was
    (0.21 -> 0.26, 0.23) on this weakly trained tiny model: it is unsure of most values anyway."""
    final = os.path.join(demo_run[0], "final")
    processor = flow.load_processor(final)
    batch = [splits["test"][i] for i in range(4)]
    schema = json.load(open(os.path.join(final, "schema.json")))

    def mean_confidence(model):
        constraint = flow.build_constraint(schema, processor, model, constrained=True)
        rows = flow.generate_batch(model, processor, batch, torch.float32, 400, 1, constraint)
        values = [field["confidence"] for row in rows for field in row["confidence"]]
        assert values and all(0.0 <= value <= 1.0 for value in values)
        return sum(values) / len(values)

    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(final).eval()
    trained = mean_confidence(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.model.language_model.parameters():
            parameter.add_(torch.randn_like(parameter) * parameter.std() * 2)
    assert mean_confidence(model) < 0.5 * trained


def test_free_figures_and_confidence_figures_in_the_metrics():
    truth = '{"a": "x", "b": "y", "c": "z"}'
    rows = [{"suffix": truth, "prediction": '{"a": "x", "b": "q", "c": "z"}', "truncated": False,
             "free_prediction": '{"a": "x", "b": "q", "c": "z"', "free_truncated": True,
             "confidence": [{"field": "a", "value": "x", "confidence": 0.95},
                            {"field": "b", "value": "q", "confidence": 0.40},   # wrong, and flagged
                            {"field": "c", "value": "z", "confidence": 0.60}]}]  # right, but flagged
    metrics = compute_metrics(rows, threshold=0.8)
    assert metrics["decoding"] == "constrained"
    assert metrics["json_valid_rate"] == 1.0 and metrics["free_json_valid_rate"] == 0.0
    assert metrics["free_truncated_rate"] == 1.0 and metrics["free_field_f1"] == 0.0
    assert metrics["field_f1"] == pytest.approx(2 / 3)
    assert metrics["confident_field_accuracy"] == 1.0 and metrics["unsure_field_accuracy"] == 0.5
    assert metrics["unsure_field_share"] == pytest.approx(2 / 3) and metrics["wrong_fields_flagged"] == 1.0
    assert list(metrics)[-1] == "per_field"
    assert compute_metrics(rows, threshold=0.5)["wrong_fields_flagged"] == 1.0
    assert compute_metrics(rows, threshold=0.3)["wrong_fields_flagged"] == 0.0


def test_no_constrained_and_no_schema_decode_free(untrained, schema):
    model, processor = untrained
    assert flow.build_constraint(schema, processor, model, constrained=False) is None
    assert flow.build_constraint(None, processor, model, constrained=True) is None
    assert flow.resolve_settings(["--no-constrained"])["CONSTRAINED"] is False
