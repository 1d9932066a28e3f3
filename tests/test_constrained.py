"""Constrained decoding (llguidance, held to the labels' schema) and per-field confidence."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from jsonschema import Draft202012Validator

import finetune_paligemma2 as flow
from paligemma_json.confidence import field_confidences, leaf_spans
from paligemma_json.constrained import ChosenTokenProbabilities, JsonSchemaConstraint, compile_schema
from paligemma_json.demo import make_manifest
from paligemma_json.json_text import parse_json
from paligemma_json.metrics import compute_metrics, score_row
from paligemma_json.schema import json_layout, with_layout
from paligemma_json.settings import resolve_settings

PROMPT = "extract data in JSON format"
# A schema an untrained model completes in about 20 tokens, so rows end (EOS, then padding) at
# different steps, and beams finish while others run on.
SHORT_SCHEMA = {"type": "object", "properties": {"route": {"type": "string", "maxLength": 6},
                                                 "dock": {"type": "integer", "minimum": 0, "maximum": 99},
                                                 "ok": {"type": "boolean"}},
                "required": ["route", "dock", "ok"], "additionalProperties": False,
                "x-guidance": {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}}


@pytest.fixture(scope="module")
def schema(splits):
    return flow.label_schema(splits)


def generate_ids(model, processor, batch, constraint, max_new_tokens, num_beams=1, ahead=False):
    inputs = flow.collate_fn(batch, processor, torch.float32, with_labels=False)
    mask = constraint.logits_processor() if constraint else None
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                logits_processor=[mask] if mask else None,
                                stopping_criteria=mask.masks_ahead() if ahead else None)
    if ahead:  # every step but the first took the mask the thread filled
        assert mask.masks_made_ahead == len(output[0]) - inputs["input_ids"].shape[1] - 1
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def assert_every_token_in_the_grammar(constraint, rows: list[list[int]], eos: int) -> None:
    """Each row replayed, token by token, through a fresh parser: each one allowed where it was written,
    and EOS only where the JSON is complete."""
    for row in rows:
        matcher = constraint.matcher()
        for step, token in enumerate(row):
            if token == eos:
                assert matcher.is_accepting(), f"EOS at step {step} ends an incomplete JSON"
                break
            assert matcher.consume_token(token), f"step {step}: token {token} is outside the grammar"


@pytest.mark.parametrize("which", ["short", "labels"])
def test_masks_filled_ahead_in_a_thread_give_the_same_tokens_all_in_the_grammar(untrained, splits, schema, which):
    """The mask filled while the model computes the step (`masks_ahead`) against the mask made at the
    step: the same tokens, every one allowed. The short schema ends rows at different steps. Applying
    the previous step's mask instead (broken on purpose once) let tokens outside the grammar through."""
    model, processor = untrained
    constraint = JsonSchemaConstraint(SHORT_SCHEMA if which == "short" else schema, processor.tokenizer)
    batch = [splits["test"][i] for i in range(4)]
    at_the_step = generate_ids(model, processor, batch, constraint, 40)
    ahead = generate_ids(model, processor, batch, constraint, 40, ahead=True)
    assert ahead == at_the_step
    assert_every_token_in_the_grammar(constraint, ahead, processor.tokenizer.eos_token_id)


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
    assert [(key, value) for key, value, *_ in leaves] == [
        ("a", "x y"), ("n", -2.5), ("items.c", 3), ("items.ok", True), ("items.c", None), ("tags", "p"), ("tags", "q")]
    assert [text[start:end] for _, _, start, end, _ in leaves][:3] == ['"x y"', "-2.5", "3"]
    # The pointer says which list item: what a reviewer's correction must name
    assert [leaf[4] for leaf in leaves] == ["/a", "/n", "/items/0/c", "/items/0/ok", "/items/1/c", "/tags/0", "/tags/1"]
    assert leaf_spans('{"a/b": {"~": 1}}')[0][4] == "/a~1b/~0"
    assert leaf_spans('{"a": "x"') == [] and leaf_spans('{"a": 1} tail') == []


def test_an_untrained_model_under_the_constraint_writes_only_schema_valid_json(untrained, splits, schema):
    model, processor = untrained
    batch = [splits["test"][i] for i in range(4)]
    free = generate_ids(model, processor, batch, None, 40)
    special = set(processor.tokenizer.added_tokens_decoder) - {processor.tokenizer.eos_token_id}
    assert any(token in special for row in free for token in row)  # what the constraint is there to stop
    constraint = flow.build_constraint(schema, processor, constrained=True)
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
    constraint = JsonSchemaConstraint(schema, processor.tokenizer)
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
    constraint = flow.build_constraint(schema, processor, constrained=True)
    rows = flow.generate_batch(model, processor, [splits["test"][0]], flow.GenerationSettings(torch.float32, 12), constraint)
    assert rows[0]["truncated"] and parse_json(rows[0]["prediction"]) is None
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


@pytest.fixture(scope="module")
def nudged(demo_assets):
    """The untrained tiny model with a fixed bias on its logits: toward the tokens of one short JSON,
    and almost as much toward special tokens the schema forbids (as an untrained PaliGemma leans to
    `<locNNNN>`). Its raw probabilities of the JSON's tokens are low, and the schema's mask, which
    renormalizes over the allowed tokens, makes them several times higher."""
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    tokenizer = flow.load_processor(demo_assets[1]).tokenizer
    bias = torch.zeros(model.lm_head.out_features)
    favoured = tokenizer('{"route": "R12", "dock": 7, "ok": true}', add_special_tokens=False)["input_ids"]
    bias[favoured] = 4 + torch.rand(len(favoured), generator=torch.Generator().manual_seed(0))
    # Digits tie, so the model's own logits choose how long each row's route is: rows end apart.
    bias[tokenizer.convert_tokens_to_ids(list("0123456789"))] = bias[favoured].max()
    bias[sorted(tokenizer.added_tokens_decoder)[-8:]] = 3.0  # `<segNNN>`
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
    return model


def left_padded_batch(splits, count):
    """Prompts of different lengths, so the batch is left-padded as the script pads it."""
    return [(image, {**entry, "prefix": entry["prefix"] + " now" * i})
            for i, (image, entry) in enumerate(splits["test"][j] for j in range(count))]


def kept_logits_probabilities(output, prompt_length: int) -> torch.Tensor:
    """The way confidence was read before issue 16: every step's raw logits kept
    (`output_logits=True`), and under beam search `beam_indices` naming each step's row."""
    tokens = output.sequences[:, prompt_length:]
    probabilities = torch.ones(tokens.shape, dtype=torch.float32)
    beam_indices = getattr(output, "beam_indices", None)
    for step, logits in enumerate(output.logits[:tokens.shape[1]]):
        source = torch.arange(tokens.shape[0]) if beam_indices is None else beam_indices[:, step]
        log_probs = torch.log_softmax(logits[source.clamp(min=0)].float(), dim=-1)
        chosen = log_probs.gather(1, tokens[:, step:step + 1]).squeeze(1).exp()
        probabilities[:, step] = torch.where(source >= 0, chosen, torch.ones_like(chosen))
    return probabilities


def answer_length(tokens: list[int], eos: int) -> int:
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_recorded_probabilities_equal_the_kept_logits_way(nudged, untrained, splits, num_beams):
    """Greedy: bit for bit; beam search: within 1e-6 (its processors get log-softmaxed logits, and
    the recorder log-softmaxes them again). Free and constrained, left-padded, rows ending apart."""
    processor = untrained[1]
    processor.tokenizer.padding_side = "left"
    inputs = flow.collate_fn(left_padded_batch(splits, 8), processor, torch.float32, with_labels=False)
    assert not inputs["attention_mask"][:, 0].all()  # some prompt is padded
    prompt, eos = inputs["input_ids"].shape[1], processor.tokenizer.eos_token_id
    for constraint in (None, JsonSchemaConstraint(SHORT_SCHEMA, processor.tokenizer)):
        recorder = ChosenTokenProbabilities(num_beams, eos)
        processors = [recorder] + ([constraint.logits_processor()] if constraint else [])
        with torch.inference_mode():
            output = nudged.generate(**inputs, max_new_tokens=30, do_sample=False, num_beams=num_beams,
                                     logits_processor=processors, output_logits=True, return_dict_in_generate=True)
        recorded, kept = recorder.probabilities(output.sequences), kept_logits_probabilities(output, prompt)
        lengths = [answer_length(tokens, eos) for tokens in output.sequences[:, prompt:].tolist()]
        for row, length in enumerate(lengths):
            if num_beams == 1:
                assert torch.equal(recorded[row, :length], kept[row, :length])
            else:
                assert recorded[row, :length] == pytest.approx(kept[row, :length], abs=1e-6, rel=0)
            assert (recorded[row, length:] == 1).all()  # past EOS
        if constraint and num_beams == 1:  # rows ended at different steps: some were padded after their EOS
            assert len(set(lengths)) > 1  # (beam search picks the same shortest route on every row here)


RECORDING_32_STEPS = """
import torch
from paligemma_json.constrained import ChosenTokenProbabilities
def status(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field + ':'))
recorder, ids = ChosenTokenProbabilities(num_beams=1, eos_token_id=1), torch.zeros((8, 20), dtype=torch.long)
with torch.inference_mode():
    open('/proc/self/clear_refs', 'w').write('5')  # peak RSS := RSS
    start = status('VmRSS')
    for step in range(32):
        scores = recorder(ids, torch.randn(8, 257216))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)
print((status('VmHWM') - start) / 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset is Linux-only")
def test_recording_holds_one_steps_log_probabilities_not_every_steps():
    """32 steps of 8 rows at PaliGemma 2's 257,216 logits, in a fresh process: every step's logits
    kept would be 256 MiB; the recorder holds one step's (8 MiB) and the one being computed."""
    done = subprocess.run([sys.executable, "-c", RECORDING_32_STEPS], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 128  # MiB above the RSS before the first step


@pytest.mark.parametrize("num_beams", [1, 2])
def test_confidence_under_the_constraint_is_the_raw_models_teacher_forced_probability(nudged, untrained, splits,
                                                                                      num_beams):
    """Each value's confidence, through `generate_batch`, against the softmax of the raw logits of
    one teacher-forced forward pass over prompt + output (not generate's logits). The masked
    scores, replayed over the same logits, give other confidences, so reading them would fail."""
    processor = untrained[1]
    batch = [splits["test"][i] for i in range(2)]
    constraint = JsonSchemaConstraint(SHORT_SCHEMA, processor.tokenizer)
    rows = flow.generate_batch(nudged, processor, batch, flow.GenerationSettings(torch.float32, 40, num_beams), constraint)
    inputs = flow.collate_fn(batch, processor, torch.float32, with_labels=False)
    prompt, eos = inputs["input_ids"].shape[1], processor.tokenizer.eos_token_id
    with torch.inference_mode():
        sequences = nudged.generate(**inputs, max_new_tokens=40, do_sample=False, num_beams=num_beams,
                                       logits_processor=[constraint.logits_processor()])
        answer = torch.ones_like(sequences[:, prompt:])  # attended causally, as a suffix (type 1)
        forced = nudged(input_ids=sequences, pixel_values=inputs["pixel_values"],
                           attention_mask=torch.cat([inputs["attention_mask"], answer], 1),
                           token_type_ids=torch.cat([inputs["token_type_ids"], answer], 1)).logits[:, prompt - 1:-1]
        mask, masked = constraint.logits_processor(), []
        for step in range(forced.shape[1]):  # what the mask made of each step's logits
            masked.append(mask(sequences[:, :prompt + step], forced[:, step].clone()))
    tokens = sequences[:, prompt:, None]
    raw = torch.softmax(forced.float(), -1).gather(-1, tokens)[..., 0]
    renormalized = torch.softmax(torch.stack(masked, 1), -1).gather(-1, tokens)[..., 0]
    for row, (generated, output) in enumerate(zip(sequences[:, prompt:].tolist(), rows)):
        answer_ids = generated[:answer_length(generated, eos) - 1]
        text = processor.tokenizer.decode(answer_ids, skip_special_tokens=True)
        assert output["prediction"] == text and output["confidence"], "a complete JSON, as generate_batch decoded it"
        expected = field_confidences(answer_ids, raw[row].tolist(), processor.tokenizer, text)
        wrong = field_confidences(answer_ids, renormalized[row].tolist(), processor.tokenizer, text)
        assert [f["confidence"] for f in output["confidence"]] == pytest.approx(
            [f["confidence"] for f in expected], abs=1e-4)
        assert max(abs(w["confidence"] - e["confidence"]) for w, e in zip(wrong, expected)) > 0.05


def test_a_schema_the_grammar_cannot_use_stops_in_one_line():
    with pytest.raises(flow.FlowError, match="the schema cannot constrain generation .*--no-constrained"):
        compile_schema({"type": "foo"})


def test_constrained_decoding_without_llguidance_is_one_line_with_the_way_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance.torch", None)  # one of the three it needs cannot load
    with pytest.raises(flow.FlowError, match=r"^constrained decoding needs llguidance \(.*\): pip install -r "
                                             r"requirements.txt, or pass --no-constrained$"):
        compile_schema({"type": "object"})


def test_only_the_values_donut_scores_get_a_confidence_mark():
    row = {"prediction": '{"a": [0, 1, true, "x"], "b": "  ", "c": 2.50}',
           "confidence": [{"field": "a", "value": v, "confidence": 0.5} for v in (0, 1, True, "x")]
           + [{"field": "b", "value": "  ", "confidence": 0.5}, {"field": "c", "value": 2.5, "confidence": 0.5}]}
    assert [(key, value) for key, value, _ in score_row(row).confident] == [
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
        constraint = flow.build_constraint(schema, processor, constrained=True)
        rows = flow.generate_batch(model, processor, batch, flow.GenerationSettings(torch.float32, 400), constraint)
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
    assert flow.build_constraint(schema, processor, constrained=False) is None
    assert flow.build_constraint(None, processor, constrained=True) is None
    assert resolve_settings(["--no-constrained"], flow.DEFAULTS, flow.__file__)["CONSTRAINED"] is False
