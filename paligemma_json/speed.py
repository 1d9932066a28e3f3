"""Analytic training FLOPs and model FLOPs utilisation (MFU) for PaliGemma 2.

FLOPs are counted from the architecture, never measured, so a run's MFU compares with any other:

    FLOPs per sample = m_lm     x 2 x N_lm     x T      (language model, non-embedding parameters)
                     + m_vision x 2 x N_vision x P      (SigLIP and the projector, per patch)
                     + m_head   x 2 x d x V    x H      (LM head: hidden x padded vocabulary)

T: the tokens the language model sees (image tokens + prompt + label, padding excluded);
P: image patches (256 at 224 px); H: positions the LM head is applied to (every position in training);
m = 6 for trained weights (forward 2 + backward 4), 4 for frozen weights that gradients still pass
through (forward 2 + gradient of the activations 2), 2 where no gradient flows (forward only).
Attention's own T^2 term is left out, as is LoRA's rank-8 matmuls: each is ~2% or less at 224 px.

MFU = FLOPs per sample x samples per second / (peak FLOP/s x devices).
"""

import torch

H100_SXM_BF16_DENSE_FLOPS = 989e12  # NVIDIA's datasheet, dense (no sparsity)


def paligemma2_3b_config(image_size: int = 224):
    """PaliGemma 2 3B's architecture (Google's published conversion config), for random weights:
    the real config cannot be downloaded everywhere."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig
    text = Gemma2Config(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, intermediate_size=9216, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, sliding_window=4096, query_pre_attn_scalar=256,
                        vocab_size=257216, hidden_activation="gelu_pytorch_tanh")
    vision = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                                patch_size=14, image_size=image_size, projection_dim=2304, vision_use_head=False)
    return PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=2304, hidden_size=2048,
                           image_token_index=257152)


def image_tokens(config) -> int:
    """Patches per image, which are also the image tokens the language model sees."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def parameter_counts(config) -> dict[str, int]:
    """Parameters per part, from a model built on the meta device (no memory, no weights).
    Embedding lookups cost no FLOPs, so the token and position embeddings are left out; the LM
    head is tied to the token embeddings and counted as its own matmul."""
    from transformers import PaliGemmaForConditionalGeneration
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    language_model, vision_tower = model.model.language_model, model.model.vision_tower

    def count(module, skip=()):
        return sum(p.numel() for name, p in module.named_parameters() if not any(s in name for s in skip))
    text = config.text_config
    return {"language_model": count(language_model, skip=("embed_tokens",)),
            "vision_tower": count(vision_tower, skip=("position_embedding",)),
            "projector": count(model.model.multi_modal_projector),
            "lm_head": text.hidden_size * text.vocab_size}


def flop_multipliers(use_lora: bool, freeze_vision: bool) -> dict[str, int]:
    """6: trained; 4: frozen, with gradients passing through to something trained below; 2: no gradient.
    Under LoRA every base weight is frozen but gradients reach the adapters (in SigLIP too, unless
    the vision tower is frozen). The LM head is tied to the embeddings: trained in a full fine-tune."""
    language = 4 if use_lora else 6
    return {"language_model": language, "lm_head": language,
            "vision_tower": 2 if freeze_vision else language, "projector": 2 if freeze_vision else language}


def training_flops_per_sample(config, tokens_per_sample: float, use_lora: bool, freeze_vision: bool,
                              lm_head_positions: float | None = None, counts: dict | None = None) -> float:
    """`tokens_per_sample`: non-padding tokens per sample, image tokens included (the Trainer's
    include_num_input_tokens_seen="non_padding" count over the samples). `lm_head_positions`:
    where the head is applied; in training the model applies it at every position (the default)."""
    counts = counts or parameter_counts(config)
    factor = flop_multipliers(use_lora, freeze_vision)
    patches = image_tokens(config)
    head_positions = tokens_per_sample if lm_head_positions is None else lm_head_positions
    return (factor["language_model"] * 2 * counts["language_model"] * tokens_per_sample
            + factor["vision_tower"] * 2 * counts["vision_tower"] * patches
            + factor["projector"] * 2 * counts["projector"] * patches
            + factor["lm_head"] * 2 * counts["lm_head"] * head_positions)


def mfu(config, tokens_per_second: float, samples_per_second: float, use_lora: bool, freeze_vision: bool,
        devices: int = 1, peak_flops: float = H100_SXM_BF16_DENSE_FLOPS) -> float:
    """Model FLOPs utilisation of a training run: the rates are the whole run's (all devices);
    `peak_flops` per device (H100 SXM bf16 dense by default)."""
    flops = training_flops_per_sample(config, tokens_per_second / samples_per_second, use_lora, freeze_vision)
    return flops * samples_per_second / (peak_flops * devices)
