"""The whole PaliGemma 2 3B architecture, once, on the CPU (issue 16, part 5). Slow: CI leaves it out.

    python -m pytest -m slow tests/test_full_depth.py -s     # ~13 GiB of memory, several minutes

Full depth (26 Gemma 2 layers, 27 SigLIP layers) at the real widths, random weights, saved and
loaded through the script's `load_model` as LoRA on a bf16 base at 224 px. One training step is
measured the way `benchmarks/real_width.py` measures its few-layer points, and its peak is the check
on the memory model fitted there (`paligemma_json/memory.py`), at a depth the fit never saw. Then a
short generation under the labels' schema with a synthetic tokenizer of the real size (257,152 made-up
tokens; the logits are 257,216 wide), confidence recorded as the script records it.
"""

import os
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytestmark = pytest.mark.slow

PREDICTION_TOLERANCE = 0.15  # the fit's own aim is 10% on held-out points; full depth is the farthest out


@pytest.fixture(scope="module")
def full_depth_shape(tmp_path_factory):
    import real_width
    shape = real_width.point("3b", 224, 26, 27, [(1, True, False, real_width.HELD_OUT)])
    return {**shape, "cache_dir": str(tmp_path_factory.mktemp("full_depth"))}


def test_one_lora_step_peaks_where_the_memory_model_predicts(full_depth_shape):
    import real_width
    from paligemma_json.memory import COEFFICIENTS, estimate
    [measured] = real_width.measure(full_depth_shape)
    cache = {}
    predicted = real_width.predicted(measured, COEFFICIENTS[("lora", "bf16")], cache)
    estimated = estimate(real_width.shape_architecture(measured, cache), real_width.setting_of(measured),
                         COEFFICIENTS[("lora", "bf16")])
    total_measured = measured["weights"] + measured["gradients"] + measured["step_peak"]
    print(f"\nfull-depth 3B, LoRA bf16, 224 px, batch 1: step activations measured {measured['step_peak'] / 1e9:.2f} GB, "
          f"predicted {predicted / 1e9:.2f} GB; weights + held gradients + step {total_measured / 1e9:.2f} GB, "
          f"estimated {(estimated.weights + estimated.gradients + estimated.activations) / 1e9:.2f} GB; "
          f"{measured['cpu_seconds']:.0f} CPU s")
    assert measured["trained_parameters"] > 0
    assert abs(predicted / measured["step_peak"] - 1) <= PREDICTION_TOLERANCE
    assert abs(estimated.weights / measured["weights"] - 1) <= 0.01  # counted, not fitted


def test_a_short_generation_under_the_schema_at_the_real_vocabulary(full_depth_shape):
    import real_width
    from grammar_masks import synthetic_tokenizer
    from paligemma_json.constrained import ChosenTokenProbabilities, JsonSchemaConstraint
    from paligemma_json.architecture import image_tokens
    model, _, _, _ = real_width.load(full_depth_shape)
    model.eval()
    tokenizer = synthetic_tokenizer()
    assert len(tokenizer) == 257_152
    schema = {"type": "object", "properties": {"route": {"type": "string"}, "total_cases": {"type": "integer"}},
              "required": ["route", "total_cases"], "additionalProperties": False}
    constraint = JsonSchemaConstraint(schema, tokenizer)
    config = model.config
    prompt = [config.image_token_index] * image_tokens(config) + tokenizer("extract data in JSON format\n")["input_ids"]
    input_ids = torch.tensor([prompt, prompt])
    size = config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": torch.zeros_like(input_ids),
              "pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    recorder = ChosenTokenProbabilities(1, tokenizer.eos_token_id)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                                logits_processor=[recorder, constraint.logits_processor()])
    generated = output.sequences[:, input_ids.shape[1]:]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in generated.tolist()]
    print(f"\nfull-depth 3B under the schema, 6 tokens: {texts}")
    assert int(generated.max()) < len(tokenizer)  # never a padded logit past the vocabulary
    assert all(text.lstrip().startswith("{") for text in texts)  # the schema's object, from the first token
    probabilities = recorder.probabilities(output.sequences)
    assert probabilities.shape == generated.shape and bool(((probabilities > 0) & (probabilities <= 1)).all())
