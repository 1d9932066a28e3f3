"""Analytic training FLOPs and model FLOPs utilisation (MFU) for PaliGemma 2.

FLOPs are counted from the architecture, never measured, so a run's MFU compares with any other:

    FLOPs per sample = m_lm     x N_lm     x T      (language model, non-embedding parameters)
                     + m_vision x N_vision x P      (SigLIP and the projector, per patch)
                     + m_head   x d x V    x H      (LM head: hidden x padded vocabulary)
                     + 6 x (A_lm x T + A_vision x P)  (LoRA's own adapters, trained)

T: the tokens the language model sees (image tokens + prompt + label, padding excluded);
P: image patches (256 at 224 px); H: positions the LM head is applied to (the label's tokens under the
script's label-only loss, paligemma_json/training.py; every position in a plain forward); A: LoRA's
parameters, rank x (in + out) per adapted linear (lora.py's rule).
m = 6 for trained weights (forward 2 + backward 4: a multiply-add is 2 FLOPs), 4 for frozen weights that
gradients still pass through (forward 2 + the activations' gradient 2), 2 where no gradient flows.
Attention's own T^2 matmuls are left out, as in the usual 6·N·T count (about 4% at the demo's widths,
where tests/test_speed.py checks this count against torch's FlopCounterMode, and less at the 3B's).
Before 2026-12-08 the count had a second factor 2 (12·N·T for a full fine-tune): MFU figures printed
before then are twice the real ones.

MFU = FLOPs per sample x samples per second / (peak FLOP/s x devices), with the peak of the GPU
the run is on, in the dtype it trains in (bf16 from compute capability 8.0, fp32 below).
"""

import torch

from paligemma_json.architecture import architecture, image_tokens
from paligemma_json.cards import CARDS, find_card  # each card's dense peak, in the dtype it trains in
from paligemma_json.lora import adapter_parameters

H100_SXM_BF16_DENSE_FLOPS = CARDS["H100 SXM"].peak_flops  # the default card of `mfu`
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def parameter_counts(config, lora_rank: int = 0, lora_targets=(), freeze_vision: bool = False) -> dict[str, int]:
    """Parameters per part whose matmuls cost FLOPs, counted on the meta device (architecture.py);
    the LM head is tied to the token embeddings and counted as its own matmul. With `lora_rank`, the
    adapters LORA_TARGET_MODULES gives each part (in SigLIP too unless the vision tower is frozen)."""
    arch = architecture(config)
    adapters = adapter_parameters(arch.lora_shapes, lora_rank, lora_targets, freeze_vision)
    return {"language_model": arch.language_model_matmul, "vision_tower": arch.vision_tower_matmul,
            "projector": arch.projector_parameters, "lm_head": arch.hidden * arch.vocab,
            "language_adapters": adapters["language_model"], "vision_adapters": adapters["vision_tower"]}


def flop_multipliers(use_lora: bool, freeze_vision: bool) -> dict[str, int]:
    """FLOPs per parameter and token. 6: trained; 4: frozen, with gradients passing through to something
    trained below; 2: no gradient. Under LoRA every base weight is frozen but gradients reach the adapters
    (in SigLIP too, unless the vision tower is frozen). The LM head is tied to the embeddings: trained in
    a full fine-tune."""
    language = 4 if use_lora else 6
    return {"language_model": language, "lm_head": language,
            "vision_tower": 2 if freeze_vision else language, "projector": 2 if freeze_vision else language}


def training_flops_per_sample(config, tokens_per_sample: float, use_lora: bool, freeze_vision: bool,
                              lm_head_positions: float | None = None, counts: dict | None = None,
                              lora_rank: int = 0, lora_targets=()) -> float:
    """`tokens_per_sample`: non-padding tokens per sample, image tokens included (the Trainer's
    include_num_input_tokens_seen="non_padding" count over the samples). `lm_head_positions`:
    where the head is applied; in training the model applies it at every position (the default).
    `lora_rank`, `lora_targets`: LORA_RANK and LORA_TARGET_MODULES, to count the adapters (under LoRA)."""
    counts = counts or parameter_counts(config, lora_rank if use_lora else 0, lora_targets, freeze_vision)
    factor = flop_multipliers(use_lora, freeze_vision)
    patches = image_tokens(config)
    head_positions = tokens_per_sample if lm_head_positions is None else lm_head_positions
    adapters = (counts["language_adapters"] * tokens_per_sample + counts["vision_adapters"] * patches
                if use_lora else 0)
    return (factor["language_model"] * counts["language_model"] * tokens_per_sample
            + factor["vision_tower"] * counts["vision_tower"] * patches
            + factor["projector"] * counts["projector"] * patches
            + factor["lm_head"] * counts["lm_head"] * head_positions
            + 6 * adapters)


def mfu(config, tokens_per_second: float, samples_per_second: float, use_lora: bool, freeze_vision: bool,
        devices: int = 1, peak_flops: float = H100_SXM_BF16_DENSE_FLOPS, lm_head_positions: float | None = None,
        lora_rank: int = 0, lora_targets=()) -> float:
    """Model FLOPs utilisation of a training run: the rates are the whole run's (all devices);
    `peak_flops` per device (H100 SXM bf16 dense by default); `lm_head_positions` per sample, every
    token when None (the script's label-only loss applies the head to the label's tokens alone)."""
    flops = training_flops_per_sample(config, tokens_per_second / samples_per_second, use_lora, freeze_vision,
                                      lm_head_positions, lora_rank=lora_rank, lora_targets=lora_targets)
    return flops * samples_per_second / (peak_flops * devices)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The card's dense peak FLOP/s in `dtype`, or None when the table has no figure for it."""
    card = find_card(device_name)
    return card.peak_flops if card and card.compute == DTYPE_NAMES.get(dtype, str(dtype)) else None


def mfu_report(config, tokens_per_second: float, samples_per_second: float, use_lora: bool, freeze_vision: bool,
               devices: int, device_name: str, dtype: torch.dtype, lm_head_positions: float | None = None,
               lora_rank: int = 0, lora_targets=()) -> str:
    """The line the script prints: MFU against this card's peak in the training dtype, or why there is none."""
    if not samples_per_second:  # tokens per sample would be 0 / 0
        return "MFU: not computed: no training step ran in this session (it resumed a finished training)"
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype))
    peak = peak_flops(device_name, dtype)
    if peak is None:
        return (f"MFU: not computed: no dense {dtype_name} peak for {device_name} in paligemma_json/cards.py's "
                "CARDS (add it from the card's datasheet)")
    utilisation = mfu(config, tokens_per_second, samples_per_second, use_lora, freeze_vision, devices, peak,
                      lm_head_positions, lora_rank, lora_targets)
    return (f"MFU: {utilisation:.1%} of {devices} x {peak / 1e12:g} TFLOP/s ({device_name}, {dtype_name} dense), "
            "over the training steps alone")


def training_rates(samples: float, tokens: float, runtime_s: float, evaluation_s: float) -> tuple[float, float]:
    """(samples/s, tokens/s) of the training steps alone. `samples`, `tokens` and `runtime_s` must
    cover the same steps (this session's, after a resume); `evaluation_s` of the runtime was validation."""
    seconds = max(runtime_s - evaluation_s, 1e-6)
    return samples / seconds, tokens / seconds


def training_report(metrics: dict, steps: int, tokens: int, evaluation_s: float, resumed: bool) -> tuple[str, float, float]:
    """The line printed after training, and the training steps' own (samples/s, tokens/s): the
    Trainer's rates also count validation, which would understate speed and MFU. `metrics`: the
    Trainer's training metrics, this session's; `tokens`: those this session's steps saw."""
    runtime = metrics["train_runtime"]
    if not metrics["train_samples_per_second"]:  # resumed from the last step's checkpoint: its rates and loss are 0
        return f"training: all {steps} steps were taken before this resume; none ran in this session", 0.0, 0.0
    samples_per_second, tokens_per_second = training_rates(metrics["train_samples_per_second"] * runtime, tokens,
                                                           runtime, evaluation_s)
    line = (f"training: {steps} steps in {runtime:.0f} s ({evaluation_s:.0f} s of it validation); the steps alone: "
            f"{samples_per_second:.2f} samples/s, {tokens_per_second:.0f} tokens/s (image and text, no padding); "
            f"final loss {metrics['train_loss']:.4f}" + (" (time and rates: this session's steps alone)" if resumed else ""))
    return line, samples_per_second, tokens_per_second
