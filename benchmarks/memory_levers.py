"""The training-step memory levers of paligemma_json/training.py at PaliGemma 2 3B's real widths,
on the CPU: the label-only loss and gradient checkpointing. CPU-derived figures.

    OMP_NUM_THREADS=1 python benchmarks/memory_levers.py                 # every variant, ~10 min on one core
    OMP_NUM_THREADS=1 python benchmarks/memory_levers.py --only loss_match

The model is 3B's architecture (paligemma_json.architecture.paligemma2_3b_config) at random weights, with
few layers: the 257,216-wide output layer, which the label-only loss cuts, does not depend on depth.
LoRA on a bf16 base, as the script trains on a GPU; a synthetic batch shaped like the pallet
manifests (image tokens, ~20 prompt tokens, ~150 label tokens, left padding). Each variant runs in a
fresh subprocess, so ru_maxrss is its own peak; `above_model` is that peak less the resident size
once the model was built (what the step adds). `loss_match` runs both losses on one fp32 model.
"""

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runner import ChildFailed, run_child  # noqa: E402

IMAGE_TOKEN_ID = 257152  # PaliGemma 2's <image>
PROMPT_TOKENS = 20
LABEL_TOKENS = (150, 140)  # per row: two manifests of different lengths, so the batch is padded

# name -> what one child measures
VARIANTS = {
    "loss_match": {"image_size": 224, "text_layers": 1, "dtype": "float32", "check": True},
    "full_224": {"image_size": 224, "text_layers": 1, "label_only": False},
    "label_only_224": {"image_size": 224, "text_layers": 1, "label_only": True},
    "full_448": {"image_size": 448, "text_layers": 1, "label_only": False},
    "label_only_448": {"image_size": 448, "text_layers": 1, "label_only": True},
    "no_checkpointing_2_layers_224": {"image_size": 224, "text_layers": 2, "label_only": True},
    "checkpointing_2_layers_224": {"image_size": 224, "text_layers": 2, "label_only": True, "checkpointing": True},
}


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_model(image_size: int, text_layers: int, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration
    import finetune_paligemma2 as flow
    from paligemma_json.architecture import paligemma2_3b_config
    config = paligemma2_3b_config(image_size)
    config.text_config.num_hidden_layers = text_layers
    config.text_config.layer_types = config.text_config.layer_types[:text_layers]
    config.vision_config.num_hidden_layers = 1
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration._from_config(config, dtype=dtype)
    return get_peft_model(model, LoraConfig(r=8, target_modules=flow.LORA_TARGET_MODULES, task_type="CAUSAL_LM"))


def synthetic_batch(image_size: int, dtype) -> dict:
    """What collate_fn gives for two manifests: image tokens, BOS and prompt, label and EOS, left padded."""
    import torch
    generator = torch.Generator().manual_seed(0)
    patches, width = (image_size // 14) ** 2, 1 + PROMPT_TOKENS + max(LABEL_TOKENS) + 1
    rows = {key: [] for key in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    for label_tokens in LABEL_TOKENS:
        prompt = [2] + torch.randint(3, 256000, (PROMPT_TOKENS - 1,), generator=generator).tolist() + [108]
        label = torch.randint(3, 256000, (label_tokens,), generator=generator).tolist() + [1]
        pad = width - len(prompt) - len(label)
        rows["input_ids"].append([0] * pad + [IMAGE_TOKEN_ID] * patches + prompt + label)
        rows["attention_mask"].append([0] * pad + [1] * (patches + len(prompt) + len(label)))
        rows["token_type_ids"].append([0] * (pad + patches + len(prompt)) + [1] * len(label))
        rows["labels"].append([-100] * (pad + patches + len(prompt)) + label)
    batch = {key: torch.tensor(value) for key, value in rows.items()}
    batch["pixel_values"] = torch.randn(len(LABEL_TOKENS), 3, image_size, image_size, generator=generator).to(dtype)
    return batch


def child(name: str, steps: int) -> dict:
    import torch
    from paligemma_json.training import (enable_gradient_checkpointing, full_logits_loss, label_only_inputs,
                                         label_only_loss)
    variant = VARIANTS[name]
    dtype = getattr(torch, variant.get("dtype", "bfloat16"))
    model = build_model(variant["image_size"], variant["text_layers"], dtype)
    batch = synthetic_batch(variant["image_size"], dtype)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    result = {"variant": name, "sequence": batch["input_ids"].shape[1], "scored": scored,
              "kept_positions": label_only_inputs(batch["labels"])["logits_to_keep"].shape[1]}
    model.train()
    if variant.get("check"):
        with torch.no_grad():
            full = float(full_logits_loss(model, batch, scored))
            label_only = float(label_only_loss(model, batch, scored))
        return {**result, "full_loss": full, "label_only_loss": label_only,
                "relative_difference": abs(label_only - full) / abs(full), "peak_mib": round(peak_mib())}
    if variant.get("checkpointing"):
        enable_gradient_checkpointing(model)
    loss_of = label_only_loss if variant["label_only"] else full_logits_loss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model_mib, seconds = resident_mib(), []
    for _ in range(steps):  # the first is a warm-up, left out of the time
        started = time.perf_counter()
        loss_of(model, batch, scored).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    timed = seconds[1:] or seconds
    return {**result, "model_mib": round(model_mib), "peak_mib": round(peak_mib()),
            "above_model_mib": round(peak_mib() - model_mib), "step_s": round(sum(timed) / len(timed), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="steps per variant, the first a warm-up")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    for name in args.only.split(","):
        try:
            print(json.dumps(run_child(__file__, [name, "--steps", str(args.steps)], name,
                                       env={"HF_HUB_OFFLINE": "1"})), flush=True)
        except ChildFailed as failure:
            print(json.dumps({"variant": name, "error": failure.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
