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
    by_hand = 6 * (counts["language_model"] * tokens + (counts["vision_tower"] + counts["projector"]) * 256
                   + 2304 * 257216 * tokens)
    assert full == pytest.approx(by_hand, rel=1e-12)
    # About 6 x (2.03e9 x 356 + 0.41e9 x 256 + 0.59e9 x 356) = 6.2e12 FLOPs per sample: 6·N·T.
    assert full == pytest.approx(6.2e12, rel=0.02)
    # The LM head is about a fifth of the language side's forward pass, as DECISIONS.md says.
    head_share = 2304 * 257216 / (2304 * 257216 + counts["language_model"])
    assert 0.18 < head_share < 0.25
    lora = training_flops_per_sample(config, tokens, use_lora=True, freeze_vision=False, counts=counts)
    assert lora == pytest.approx(full * 4 / 6, rel=1e-12)  # every part backpropagated through, none trained
    frozen = training_flops_per_sample(config, tokens, use_lora=True, freeze_vision=True, counts=counts)
    assert frozen < lora
    head_only_on_labels = training_flops_per_sample(config, tokens, False, False, lm_head_positions=60, counts=counts)
    assert full - head_only_on_labels == pytest.approx(6 * 2304 * 257216 * (tokens - 60), rel=1e-9)


def test_mfu_is_model_flops_over_the_peak(config):
    # 4 samples/s of 356 tokens, full fine-tune: 4 x 6.2e12 / 989e12 = ~2.5%.
    value = mfu(config, tokens_per_second=4 * 356, samples_per_second=4, use_lora=False, freeze_vision=False)
    per_sample = training_flops_per_sample(config, 356, False, False)
    assert value == pytest.approx(4 * per_sample / H100_SXM_BF16_DENSE_FLOPS)
    assert 0.0225 < value < 0.0275
    assert mfu(config, 8 * 356, 8, False, False, devices=2) == pytest.approx(value)  # twice the rate on two GPUs


def test_mfu_counts_the_lm_head_where_the_label_only_loss_runs_it(config):
    # The script's loss applies the 257,216-wide head to the label's tokens alone: MFU counts that.
    everywhere = mfu(config, 4 * 356, 4, True, False)
    on_labels = mfu(config, 4 * 356, 4, True, False, lm_head_positions=150)
    assert everywhere - on_labels == pytest.approx(4 * 4 * 2304 * 257216 * (356 - 150) / H100_SXM_BF16_DENSE_FLOPS)


def test_the_lora_adapters_are_counted_as_trained_weights(config, counts):
    """Rank 8 on the tutorial's seven names: in each Gemma 2 layer q, k, v, o and the MLP's three; in
    SigLIP q, k and v (its output is `out_proj`), unless the vision tower is frozen."""
    targets = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    with_adapters = parameter_counts(config, 8, targets, freeze_vision=False)
    per_text_layer = 8 * ((2304 + 2048) + (2304 + 1024) * 2 + (2048 + 2304) + (2304 + 9216) * 2 + (9216 + 2304))
    assert with_adapters["language_adapters"] == 26 * per_text_layer
    assert with_adapters["vision_adapters"] == 27 * 3 * 8 * (1152 + 1152)
    assert parameter_counts(config, 8, targets, freeze_vision=True)["vision_adapters"] == 0
    lora = training_flops_per_sample(config, 356, True, False, lora_rank=8, lora_targets=targets)
    assert lora - training_flops_per_sample(config, 356, True, False) == pytest.approx(
        6 * (26 * per_text_layer * 356 + 27 * 3 * 8 * 2304 * 256), rel=1e-12)


@pytest.mark.parametrize("use_lora, freeze_vision", [(False, False), (True, False), (True, True)],
                         ids=["full", "lora", "lora-frozen-vision"])
def test_the_count_agrees_with_torchs_flop_counter(demo_assets, processor, splits, use_lora, freeze_vision):
    """The demo's tiny PaliGemma 2 as step 4 loads it, one sample forward and backward on the CPU, its
    matmuls and convolutions counted op by op by torch. Attention's own matmuls (`aten.bmm`: 17-22% here,
    at 128 wide over 197 tokens; a few % at the 3B's widths) are left out of the counter's total, as the
    formula leaves them out. What remains: norms' and biases' parameters counted as matmul weights,
    SigLIP's patch convolution, whose input needs no gradient, and with the vision tower frozen, the first
    text layer's frozen weights, whose input needs none either (one layer of two here, of 26 in the 3B)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import finetune_paligemma2 as flow
    torch.manual_seed(0)
    model = flow.load_model(demo_assets[1], use_lora, False, freeze_vision, 8, flow.LORA_TARGET_MODULES,
                            torch.float32)
    model.train()
    inputs = flow.collate_fn([splits["train"][0]], processor, torch.float32)  # one sample: no padding
    counter = FlopCounterMode(display=False)
    with counter:
        model(**inputs).loss.backward()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert 0.1 < by_op["aten.bmm"] / sum(by_op.values()) < 0.3  # measured 0.17-0.22: here T^2 weighs
    measured = sum(flops for op, flops in by_op.items() if op != "aten.bmm")
    counted = training_flops_per_sample(model.config, inputs["input_ids"].shape[1], use_lora, freeze_vision,
                                        inputs["logits_to_keep"].shape[1],  # the label-only loss's head positions
                                        lora_rank=8, lora_targets=flow.LORA_TARGET_MODULES)
    assert counted == pytest.approx(measured, rel=0.04)  # measured +0.5% full, +0.7% LoRA, +3.6% frozen vision
