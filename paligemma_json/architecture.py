"""PaliGemma 2's architecture without its weights: the config of each size, and what is counted
from a model built on the meta device (no memory, no download), once for both readers: the memory
estimate (memory.py) and the training FLOPs (speed.py)."""

from dataclasses import dataclass

import torch

# Text (Gemma 2) and projector widths per PaliGemma 2 size: Google's published conversion configs for
# the 3B; the 10B's and 28B's follow Gemma 2 9B's and 27B's public configs, recalled rather than checked
# offline (shared/DECISIONS.md, "GPU work"). SigLIP So400m/14 is the same vision tower in all three.
PALIGEMMA2_TEXT = {
    "3b": dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
               intermediate_size=9216, query_pre_attn_scalar=256),
    "10b": dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                intermediate_size=14336, query_pre_attn_scalar=256),
    "28b": dict(hidden_size=4608, num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                intermediate_size=36864, query_pre_attn_scalar=144),
}


def paligemma2_config(size: str = "3b", image_size: int = 224, text_layers: int | None = None,
                      vision_layers: int | None = None):
    """PaliGemma 2's architecture for random weights (the real config cannot be downloaded
    everywhere). `text_layers`/`vision_layers`: fewer layers at the real widths, for measuring."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig
    text_widths = dict(PALIGEMMA2_TEXT[size])
    if text_layers is not None:
        text_widths["num_hidden_layers"] = text_layers
    hidden = text_widths["hidden_size"]
    text = Gemma2Config(**text_widths, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        sliding_window=4096, vocab_size=257216, hidden_activation="gelu_pytorch_tanh")
    vision = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=27 if vision_layers is None else vision_layers,
                                num_attention_heads=16, intermediate_size=4304, patch_size=14, image_size=image_size,
                                projection_dim=hidden, vision_use_head=False)
    return PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=hidden, hidden_size=2048,
                           image_token_index=257152)


def paligemma2_3b_config(image_size: int = 224):
    """PaliGemma 2 3B's architecture (Google's published conversion config), for random weights."""
    return paligemma2_config("3b", image_size)


def image_tokens(config) -> int:
    """Patches per image, which are also the image tokens the language model sees."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


@dataclass(frozen=True)
class Architecture:
    """The numbers the memory estimate and the FLOPs use, read from a PaliGemma config."""
    hidden: int
    heads: int
    text_layers: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    patches: int
    parameters: int  # every parameter (tied embedding once)
    linear_weights: int  # nn.Linear weights that QLoRA quantizes (all but the LM head)
    vision_parameters: int  # SigLIP and the projector: what FREEZE_VISION freezes
    text_layer_weights: int  # one Gemma 2 layer's linear weights (a full fine-tune's per-layer extra)
    vision_layer_weights: int
    lora_shapes: tuple  # ((name, in, out), ...) of every nn.Linear, to count adapters for any targets
    # Per part, the parameters whose matmuls cost FLOPs: embedding lookups cost none, so the token and
    # position embeddings are left out (the LM head, tied to the token embeddings, is its own matmul).
    language_model_matmul: int
    vision_tower_matmul: int
    projector_parameters: int


def architecture(config) -> Architecture:
    from transformers import PaliGemmaForConditionalGeneration
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]
    text, vision = config.text_config, config.vision_config

    def layer_weights(prefix):
        return sum(module.weight.numel() for name, module in linears if prefix in name)

    def count(module, skip=()):
        return sum(p.numel() for name, p in module.named_parameters() if not any(s in name for s in skip))
    vision_parts = (model.model.vision_tower, model.model.multi_modal_projector)
    return Architecture(
        hidden=text.hidden_size, heads=text.num_attention_heads, text_layers=text.num_hidden_layers,
        vocab=text.vocab_size, vision_hidden=vision.hidden_size, vision_layers=vision.num_hidden_layers,
        patches=image_tokens(config),
        parameters=sum(p.numel() for p in model.parameters()),
        linear_weights=sum(module.weight.numel() for _, module in linears),
        vision_parameters=sum(p.numel() for part in vision_parts for p in part.parameters()),
        text_layer_weights=layer_weights("language_model.layers.0."),
        vision_layer_weights=layer_weights("encoder.layers.0."),
        lora_shapes=tuple((name, module.in_features, module.out_features) for name, module in linears),
        language_model_matmul=count(model.model.language_model, skip=("embed_tokens",)),
        vision_tower_matmul=count(model.model.vision_tower, skip=("position_embedding",)),
        projector_parameters=count(model.model.multi_modal_projector),
    )
