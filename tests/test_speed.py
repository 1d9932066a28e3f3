"""The analytic FLOPs behind MFU, on PaliGemma 2 3B-224's real architecture (meta device, no weights).
Every expected figure below can be checked by hand from DECISIONS.md's numbers."""

import pytest

from paligemma_json.architecture import image_tokens, paligemma2_3b_config
from paligemma_json.speed import (H100_SXM_BF16_DENSE_FLOPS, flop_multipliers, mfu, parameter_counts,
                                  training_flops_per_sample)


@pytest.fixture(scope="module")
def config():
    return paligemma2_3b_config(224)


@pytest.fixture(scope="module")
def counts(config):
    return parameter_counts(config)


def test_parameter_counts_match_the_published_sizes(counts):
    # Gemma 2 2B per layer: attention 2304 x (8x256 + 2x4x256 + 8x256) = 14.2M, MLP 3 x 2304 x 9216 = 63.7M;
    # x 26 layers = 2.03e9.
    assert counts["language_model"] == pytest.approx(2.0e9, rel=0.10)
    assert counts["language_model"] == pytest.approx(26 * (2304 * 6144 + 3 * 2304 * 9216), rel=0.001)
    # SigLIP So400m/14 per layer: attention 4 x 1152^2 = 5.3M, MLP 2 x 1152 x 4304 = 9.9M; x 27 = 0.41e9.
    assert counts["vision_tower"] == pytest.approx(0.4e9, rel=0.10)
    assert counts["projector"] == 1152 * 2304 + 2304
    assert counts["lm_head"] == 2304 * 257216


def test_image_tokens_follow_the_resolution():
    assert [image_tokens(paligemma2_3b_config(size)) for size in (224, 448, 896)] == [256, 1024, 4096]


def test_multipliers_per_mode():
    assert flop_multipliers(use_lora=False, freeze_vision=False) == {
        "language_model": 6, "lm_head": 6, "vision_tower": 6, "projector": 6}
    assert flop_multipliers(use_lora=True, freeze_vision=False) == {
        "language_model": 4, "lm_head": 4, "vision_tower": 4, "projector": 4}
    assert flop_multipliers(use_lora=True, freeze_vision=True) == {
        "language_model": 4, "lm_head": 4, "vision_tower": 2, "projector": 2}
    assert flop_multipliers(use_lora=False, freeze_vision=True)["vision_tower"] == 2


def test_flops_per_sample_by_hand(config, counts):
    tokens = 256 + 100  # image tokens + prompt and label
    full = training_flops_per_sample(config, tokens, use_lora=False, freeze_vision=False, counts=counts)
    by_hand = 6 * 2 * (counts["language_model"] * tokens + (counts["vision_tower"] + counts["projector"]) * 256
                       + 2304 * 257216 * tokens)
    assert full == pytest.approx(by_hand, rel=1e-12)
    # About 6 x 2 x (2.03e9 x 356 + 0.41e9 x 256 + 0.59e9 x 356) = 1.24e13 FLOPs per sample.
    assert full == pytest.approx(1.24e13, rel=0.02)
    # The LM head is about a fifth of the language side's forward pass, as DECISIONS.md says.
    head_share = 2304 * 257216 / (2304 * 257216 + counts["language_model"])
    assert 0.18 < head_share < 0.25
    lora = training_flops_per_sample(config, tokens, use_lora=True, freeze_vision=False, counts=counts)
    assert lora == pytest.approx(full * 4 / 6, rel=1e-12)  # every part backpropagated through, none trained
    frozen = training_flops_per_sample(config, tokens, use_lora=True, freeze_vision=True, counts=counts)
    assert frozen < lora
    head_only_on_labels = training_flops_per_sample(config, tokens, False, False, lm_head_positions=60, counts=counts)
    assert full - head_only_on_labels == pytest.approx(6 * 2 * 2304 * 257216 * (tokens - 60), rel=1e-9)


def test_mfu_is_model_flops_over_the_peak(config):
    # 4 samples/s of 356 tokens, full fine-tune: 4 x 1.24e13 / 989e12 = ~5%.
    value = mfu(config, tokens_per_second=4 * 356, samples_per_second=4, use_lora=False, freeze_vision=False)
    per_sample = training_flops_per_sample(config, 356, False, False)
    assert value == pytest.approx(4 * per_sample / H100_SXM_BF16_DENSE_FLOPS)
    assert 0.045 < value < 0.055
    assert mfu(config, 8 * 356, 8, False, False, devices=2) == pytest.approx(value)  # twice the rate on two GPUs


def test_mfu_counts_the_lm_head_where_the_label_only_loss_runs_it(config):
    # The script's loss applies the 257,216-wide head to the label's tokens alone: MFU counts that.
    everywhere = mfu(config, 4 * 356, 4, True, False)
    on_labels = mfu(config, 4 * 356, 4, True, False, lm_head_positions=150)
    assert everywhere - on_labels == pytest.approx(4 * 4 * 2 * 2304 * 257216 * (356 - 150) / H100_SXM_BF16_DENSE_FLOPS)
