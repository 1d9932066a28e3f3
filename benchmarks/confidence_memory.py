"""What per-field confidence adds to generation's memory, at PaliGemma 2's real vocabulary (issue 16).

    python benchmarks/confidence_memory.py      # ~8.5 min on a quiet core; one subprocess at a time, peak RSS ~6 GiB

PaliGemma 2 3B at its real widths (`paligemma_json.architecture.paligemma2_3b_config`: hidden 2304, logits
257,216 wide, SigLIP So400m at 224 px, 256 image tokens) with one text layer and one vision layer,
random weights, fp32 on the CPU (the script's CPU dtype). 8 images x 256 new tokens, greedy, free
(`min_new_tokens` forces all 256 steps; the constraint's mask costs the same in every variant).
Three variants, each in a fresh subprocess:

- `none`: no confidence: what generation itself adds (KV cache, the prefill's activations);
- `kept_logits`: confidence as before issue 16: `output_logits=True` keeps every step's raw logits
  until `generate` returns, then each step's log-softmax picks the chosen token;
- `recorded`: `ChosenTokenProbabilities` first in `logits_processor` (what the script does now).

Memory: peak RSS minus the RSS after loading, in the variant's own process: VmHWM after resetting
it through /proc/self/clear_refs once the model is loaded, and `ru_maxrss` beside it (which the
reset also lowers on Linux 4+).

Predicted before measuring: `kept_logits` adds 256 steps x 8 rows x 257,216 x 4 B = 2,009 MiB over
`none`; `recorded` adds the last step's log-softmax and the one being computed, 2 x 8 x 257,216 x 4 B
= 16 MiB, plus its per-step bookkeeping (under 1 MiB); it now rewrites one buffer in place: 8 MiB.
`none` itself is the one-layer prefill's activations and the KV cache, a few hundred MiB. So
`recorded` / `kept_logits` about 0.1-0.15 here.

The full-depth estimate (26 text layers) adds 25 more layers of KV cache to every variant, computed,
not measured: a CPU-derived estimate. Last line: `confidence_memory_ratio=<recorded / kept_logits>`.
"""

import argparse
import gc
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import status_kib  # noqa: E402  (/proc/self/status, as bench.py reads peak RSS)
from runner import ChildFailed, run_child  # noqa: E402

VARIANTS = ("none", "kept_logits", "recorded")
LOGITS = 257_216


def kept_logits_probabilities(output, prompt_length: int):
    """Confidence as `generate_batch` read it before issue 16 (greedy: row i's logits are row i's)."""
    import torch
    tokens = output.sequences[:, prompt_length:]
    probabilities = torch.ones(tokens.shape, dtype=torch.float32)
    for step, logits in enumerate(output.logits[:tokens.shape[1]]):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probabilities[:, step] = log_probs.gather(1, tokens[:, step:step + 1]).squeeze(1).exp()
    return probabilities


def build(images: int, text_layers: int):
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma_json.architecture import image_tokens, paligemma2_3b_config
    torch.manual_seed(0)
    config = paligemma2_3b_config()
    config.text_config.num_hidden_layers = text_layers
    config.vision_config.num_hidden_layers = 1
    model = PaliGemmaForConditionalGeneration(config).eval()
    prompt = [config.image_token_index] * image_tokens(config) + [2] + list(range(1000, 1010)) + [108]  # bos, text, \n
    input_ids = torch.tensor([prompt] * images)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": torch.zeros_like(input_ids),
              "pixel_values": torch.randn(images, 3, config.vision_config.image_size, config.vision_config.image_size)}
    return model, inputs


def child_main(variant: str, images: int, new_tokens: int, text_layers: int) -> dict:
    import torch

    from paligemma_json.constrained import ChosenTokenProbabilities
    model, inputs = build(images, text_layers)
    prompt_length = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    generation = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      return_dict_in_generate=True)
    gc.collect()
    maxrss_after_load_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # peak RSS := current RSS
    loaded_kib = status_kib("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        if variant == "kept_logits":
            output = model.generate(**inputs, output_logits=True, **generation)
            probabilities = kept_logits_probabilities(output, prompt_length)
        elif variant == "recorded":
            recorder = ChosenTokenProbabilities(num_beams=1, eos_token_id=eos)
            output = model.generate(**inputs, logits_processor=[recorder], **generation)
            probabilities = recorder.probabilities(output.sequences)
        else:
            output = model.generate(**inputs, **generation)
            probabilities = None
    seconds = time.perf_counter() - start
    generated = output.sequences.shape[1] - prompt_length
    assert generated == new_tokens, f"generated {generated} tokens, not {new_tokens}"
    return {"variant": variant, "seconds": round(seconds, 1), "generated": generated,
            "rss_after_load_mib": round(loaded_kib / 1024),
            "ru_maxrss_before_reset_mib": round(maxrss_after_load_kib / 1024),
            "added_mib": round((status_kib("VmHWM") - loaded_kib) / 1024, 1),
            "added_ru_maxrss_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - loaded_kib) / 1024, 1),
            "probability_sum": None if probabilities is None else round(float(probabilities.sum()), 4)}


def kv_cache_mib_per_layer(images: int, tokens: int, bytes_per_value: int) -> float:
    """Keys and values of one Gemma 2 2B layer: 4 KV heads of 256."""
    return 2 * 4 * 256 * bytes_per_value * images * tokens / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child, args.images, args.new_tokens, args.text_layers)))
        return
    results = {}
    for variant in VARIANTS:  # one at a time: each holds the ~2.8 GiB model
        try:
            results[variant] = run_child(__file__, [variant, "--images", str(args.images), "--new-tokens",
                                                    str(args.new_tokens), "--text-layers", str(args.text_layers)], variant)
        except ChildFailed as failure:
            sys.exit(str(failure))
        print(json.dumps(results[variant]), flush=True)
    steps_rows = args.new_tokens * args.images
    predicted = {"none": None, "kept_logits": steps_rows * LOGITS * 4 / 2**20,
                 "recorded": args.images * LOGITS * 4 / 2**20}  # one buffer of rows x vocabulary
    print(f"\n{args.images} images x {args.new_tokens} new tokens, {args.text_layers} text layer(s), "
          "real widths, fp32, CPU")
    print("| variant | added above the loaded model, MiB (VmHWM) | ru_maxrss | over `none`, measured "
          "| over `none`, predicted | s |")
    print("|---|---|---|---|---|---|")
    for variant, result in results.items():
        over = result["added_mib"] - results["none"]["added_mib"]
        guess = "" if predicted[variant] is None else f"{predicted[variant]:,.0f}"
        print(f"| {variant} | {result['added_mib']:,.0f} | {result['added_ru_maxrss_mib']:,.0f} | {over:,.0f} "
              f"| {guess} | {result['seconds']} |")
    ratio = results["recorded"]["added_mib"] / results["kept_logits"]["added_mib"]
    tokens = 256 + 12 + args.new_tokens  # image tokens + prompt + generated
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        more = (26 - args.text_layers) * kv_cache_mib_per_layer(args.images, tokens, size)
        estimate = (results["recorded"]["added_mib"] + more) / (results["kept_logits"]["added_mib"] + more)
        print(f"full depth (26 layers), {dtype} KV cache: +{more:,.0f} MiB in every variant; "
              f"recorded / kept_logits = {estimate:.3f} (CPU-derived estimate)")
    print(f"confidence_memory_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
