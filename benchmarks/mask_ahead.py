"""The schema's mask filled ahead in a thread (`SchemaLogitsProcessor.masks_ahead`, what the script
does) against the mask made at the step, at PaliGemma 2's vocabulary size, beside a real forward pass.

    OMP_NUM_THREADS=1 python benchmarks/mask_ahead.py          # about 3 minutes on this project's CPU

The demo's model cannot write 257,152 tokens, so this imitates `generate`'s greedy loop: each step runs
the model's forward at batch 8 over its KV cache (the time the mask can hide behind), then the schema's
processor over 257,216-wide rows of scores (random, the same for both variants, so both write the
same tokens, which is checked), then the argmax, then the stopping criterion that starts the next
mask. Tokens come from a synthetic 257,152-token tokenizer (benchmarks/grammar_masks.py) and the
demo's pallet-manifest schema, as gpu_check's generation part has them. Two forwards: the demo's tiny
model (shorter than the mask: the overlap can hide only the forward's length) and the 3B's real widths
with 2 + 2 layers (longer: the whole fill can hide). Reported: ms per step of each; the schema
processor's time in the step, at the step and ahead; the fill's own time (the part that runs ahead:
parsers advanced, bitmask filled); and the last line `mask_ahead_speedup=<at the step / ahead>` for the
real widths. The rest of the processor (the bits unpacked and the scores masked) runs where the logits
are: here on the CPU, in a real run on the GPU.
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import parent_arguments, run_child  # noqa: E402

BATCH, STEPS, REPEATS = 8, 48, 3


def measure(request: dict) -> dict:
    import torch
    from transformers import DynamicCache

    import finetune_paligemma2 as flow
    from gpu_check import schema_and_tokenizer
    from paligemma_json.architecture import image_tokens
    from paligemma_json.constrained import JsonSchemaConstraint
    torch.manual_seed(0)
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(request["model_dir"], dtype=torch.float32).eval()
    schema, tokenizer = schema_and_tokenizer()
    constraint = JsonSchemaConstraint(schema, tokenizer)
    vocab = 257_216
    generator = torch.Generator().manual_seed(1)
    scores_by_step = [torch.randn(BATCH, vocab, generator=generator) for _ in range(STEPS)]
    size = model.config.vision_config.image_size
    pixels = torch.randn(BATCH, 3, size, size)
    prompt = [model.config.image_token_index] * image_tokens(model.config)
    prompt_ids = torch.tensor([prompt + [2, 10, 11, 108]] * BATCH)

    fills = []  # seconds of each mask's fill (parsers advanced, bitmask filled), wherever it ran

    def decode(ahead: bool) -> tuple[float, float, list]:
        mask = constraint.logits_processor()
        fill = mask._mask

        def timed_fill(rows):
            begun = time.perf_counter()
            bitmask = fill(rows)
            fills.append(time.perf_counter() - begun)
            return bitmask
        mask._mask = timed_fill
        stopping = mask.masks_ahead()[0] if ahead else None
        ids = torch.zeros(BATCH, 1, dtype=torch.long)  # the tokens the schema sees (the synthetic vocabulary)
        with torch.inference_mode():
            cache = DynamicCache(config=model.config.get_text_config(decoder=True))
            model(input_ids=prompt_ids, pixel_values=pixels, token_type_ids=torch.zeros_like(prompt_ids),
                  cache=cache, use_cache=True)
            masking = 0.0
            started = time.perf_counter()
            for step in range(STEPS):
                model(input_ids=torch.full((BATCH, 1), 10), cache=cache, use_cache=True)  # the forward to hide behind
                begun = time.perf_counter()
                masked = mask(ids, scores_by_step[step].clone())
                masking += time.perf_counter() - begun
                ids = torch.cat([ids, masked.argmax(-1, keepdim=True)], dim=1)
                if stopping is not None:
                    stopping(ids, masked)
            total = time.perf_counter() - started
        return 1000 * total / STEPS, 1000 * masking / STEPS, ids.tolist()

    decode(False)  # warm: the tokenizer bridge, the allocator
    del fills[:]
    rows = {}
    for ahead in (False, True):
        runs = [decode(ahead) for _ in range(REPEATS)]
        rows[ahead] = {"ms_per_step": statistics.median(r[0] for r in runs),
                       "waited_for_mask_ms": statistics.median(r[1] for r in runs), "tokens": runs[0][2]}
    # Ahead, the processor's time is the wait for the thread; at the step, it is the whole mask.
    same = rows[False]["tokens"] == rows[True]["tokens"]
    return {"model": request["model"], "at_step_ms": rows[False]["ms_per_step"], "ahead_ms": rows[True]["ms_per_step"],
            "mask_ms": rows[False]["waited_for_mask_ms"], "waited_ahead_ms": rows[True]["waited_for_mask_ms"],
            "fill_ms": 1000 * statistics.median(fills),
            "same_tokens": same}


def main(argv=None) -> None:
    if (args := parent_arguments(__doc__, measure, argv)) is None:
        return
    from decode import prepare
    work = prepare(args.work_dir or tempfile.mkdtemp(prefix="mask_ahead_"), "cpu")
    print(f"{STEPS} greedy steps at batch {BATCH}, a 257,216-wide mask from the demo's schema; median of {REPEATS}")
    ratio = None
    for model in ("demo", "real-width"):
        row = run_child(__file__, [json.dumps({"model": model, "model_dir": work["models"][model]})], model)
        ratio = row["at_step_ms"] / row["ahead_ms"]
        print(f"{model:10} mask at the step {row['at_step_ms']:7.2f} ms/step, filled ahead {row['ahead_ms']:7.2f} "
              f"ms/step (x{ratio:.2f}); the schema's processor {row['mask_ms']:.2f} ms a step at the step, "
              f"{row['waited_ahead_ms']:.2f} ms ahead; its fill {row['fill_ms']:.2f} ms (the rest: the bits unpacked and "
              f"the scores masked, where the logits are); same tokens: {row['same_tokens']}", flush=True)
        if not row["same_tokens"]:
            sys.exit("mask_ahead: the two variants wrote different tokens")
    print(f"mask_ahead_speedup={ratio:.2f}")


if __name__ == "__main__":
    main()
