"""Decoding speed: today's path (a dynamic KV cache, eager steps) against the fast one (a static cache
and a compiled decoding step; paligemma_json/decoding.py), free and constrained, with the LoRA adapter
unmerged and merged, through the script's own `generate_batch`.

    OMP_NUM_THREADS=1 python benchmarks/decode.py --quick    # the CPU, under 10 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/decode.py            # every variant, and the static cache alone
    python benchmarks/decode.py --device cuda --quick        # on a GPU (gpu_check.py's `decoding` part)

Two models: the demo's tiny PaliGemma 2, and the 3B's real widths with 2 text and 2 vision layers at
224 px and the demo's vocabulary (random weights; built as gpu_check's real-width part builds it). Each
measurement runs in a fresh process (runner.py): the model is loaded (fp32 on a CPU, bf16 on a GPU), a
LoRA adapter with non-zero B is attached (or merged into the weights), and 16 of the demo's test
images are decoded in batches of 8 at the labels' token budget: once to warm up (for the fast path,
the compilation: `warmup_s`), then `--repeats` times, timed. ms per step is the decoding steps' own
time: the wall time less the prefill (the same batch with one new token), over the steps taken.

The last line is `decode_speedup=<today's ms per step over the fast path's>` for the real-width
model, free decoding, adapter unmerged: what a user's test set gets.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import answer_if_child, run_child  # noqa: E402

IMAGES, BATCH = 16, 8
QUICK_REAL_WIDTH_TOKENS = 48  # --quick: a real-width step is ~0.16 s on one core; the labels' 218 took 6 min a side
REAL_WIDTH = {"image_size": 224, "text_layers": 2, "vision_layers": 2}
PATHS = ("today", "static", "compiled")  # static: the static cache alone, uncompiled


def plan(quick: bool) -> list[dict]:
    """(model, path, constrained, adapter) per measurement; --quick: what the speed-up is read from."""
    rows = []
    for model in ("demo", "real-width"):
        for constrained in (False, True):
            for adapter in ("unmerged", "merged"):
                for path in PATHS:
                    if quick and (path == "static" or adapter == "merged" or (model == "real-width" and constrained)):
                        continue
                    rows.append({"model": model, "path": path, "constrained": constrained, "adapter": adapter})
                    # The schema's mask made at the step, as before it was filled ahead in a thread
                    if constrained and path != "static" and not (quick and path == "compiled"):
                        rows.append({**rows[-1], "mask": "at-step"})
    return rows


# --- One measurement (a child process) -------------------------------------------------------------

def load_with_adapter(model_dir: str, dtype, device: str, merged: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    import finetune_paligemma2 as flow
    torch.manual_seed(0)
    base = flow.PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device_map={"": device})
    model = get_peft_model(base, LoraConfig(r=8, target_modules=flow.LORA_TARGET_MODULES, init_lora_weights=False,
                                            task_type="CAUSAL_LM"))
    return (model.merge_and_unload() if merged else model).eval()


def measure(request: dict) -> dict:
    import torch

    import finetune_paligemma2 as flow
    from paligemma_json.decoding import FastDecoding
    device = request["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_with_adapter(request["model_dir"], dtype, device, request["adapter"] == "merged")
    processor = flow.load_processor(request["model_dir"])
    splits = flow.load_splits(request["dataset_dir"], "extract data in JSON format")
    images = [splits["test"][i] for i in range(min(IMAGES, len(splits["test"])))]
    constraint = flow.build_constraint(flow.label_schema(splits, ""), processor, request["constrained"])
    if request.get("mask") == "at-step":
        from paligemma_json.constrained import SchemaLogitsProcessor
        SchemaLogitsProcessor.masks_ahead = lambda self: None
    path = request["path"]
    fast = None if path == "today" else FastDecoding(True, compiled=path == "compiled", devices=(device,))
    steps = []
    generate = model.generate

    def counting_generate(**kwargs):  # the steps each batch took: its longest row
        output = generate(**kwargs)
        steps.append(output.sequences.shape[1] - kwargs["input_ids"].shape[1])
        return output
    model.generate = counting_generate

    def decode(max_new_tokens: int) -> float:
        generation = flow.GenerationSettings(dtype, max_new_tokens, 1, BATCH, fast)
        started = time.perf_counter()
        for first in range(0, len(images), BATCH):
            flow.generate_batch(model, processor, images[first:first + BATCH], generation, constraint)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started
    started = time.perf_counter()
    decode(request["max_new_tokens"])
    warmup = time.perf_counter() - started
    decode(1)  # the prefill's own shapes warmed too
    prefill = statistics.median(decode(1) for _ in range(request["repeats"]))
    del steps[:]
    walls = [decode(request["max_new_tokens"]) for _ in range(request["repeats"])]
    steps_per_run = sum(steps) / request["repeats"]
    wall = statistics.median(walls)
    return {**{key: request[key] for key in ("model", "path", "constrained", "adapter")}, "mask": request.get("mask"),
            "warmup_s": warmup, "wall_s": wall, "prefill_s": prefill, "steps": steps_per_run,
            "ms_per_step": 1000 * (wall - prefill) / steps_per_run, "images_per_s": len(images) / wall,
            "failed": fast.failed if fast else None}


# --- The plan and the report ------------------------------------------------------------------------

def prepare(work_dir: str, device: str) -> dict:
    """The demo's export and tiny model, and the real-width model, built once in `work_dir`."""
    from gpu_check_script import build_real_width_model

    from paligemma_json.dataset_report import label_tokens, token_budget
    from paligemma_json.demo import build_demo
    import finetune_paligemma2 as flow
    dataset_dir, demo_model = build_demo(work_dir, seed=0, reuse=True)
    real_width = os.path.join(work_dir, "real-width")
    if not os.path.isdir(real_width):
        build_real_width_model(demo_model, real_width, REAL_WIDTH)
    splits = flow.load_splits(dataset_dir, "extract data in JSON format")
    counts = label_tokens(splits, flow.load_processor(demo_model).tokenizer)
    return {"dataset_dir": dataset_dir, "models": {"demo": demo_model, "real-width": real_width},
            "max_new_tokens": token_budget(counts["train"] + counts["valid"]), "device": device}


def line(row: dict) -> str:
    constrained = ("constrained" + (", mask at the step" if row.get("mask") else "")) if row["constrained"] else "free"
    name = f"{row['model']:10} {row['path']:8} {constrained:30} {row['adapter']:8}"
    if "error" in row:
        return f"{name} failed: {row['error']}"
    fell_back = f"  (fell back: {row['failed']})" if row.get("failed") else ""
    return (f"{name} {row['ms_per_step']:8.2f} ms/step {row['images_per_s']:7.2f} images/s  {row['steps']:5.0f} steps "
            f"warm-up {row['warmup_s']:6.1f} s{fell_back}")


def speedup(rows: list[dict], model: str, constrained: bool = False) -> float | None:
    by_path = {row["path"]: row for row in rows if row["model"] == model and row["constrained"] == constrained
               and row["adapter"] == "unmerged" and not row.get("mask") and "error" not in row and not row.get("failed")}
    if "today" in by_path and "compiled" in by_path:
        return by_path["today"]["ms_per_step"] / by_path["compiled"]["ms_per_step"]
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the variants the speed-up is read from")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--out", default="", help="a JSON file for every row")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if answer_if_child(args, measure):
        return
    work = prepare(args.work_dir or tempfile.mkdtemp(prefix="decode_"), args.device)
    print(f"decoding {IMAGES} images in batches of {BATCH}, up to {work['max_new_tokens']} new tokens "
          f"({QUICK_REAL_WIDTH_TOKENS} at the real widths with --quick), on {args.device}; ms per step is the median "
          f"of {args.repeats} runs, prefill excluded", flush=True)
    rows = []
    for variant in plan(args.quick):
        budget = work["max_new_tokens"]
        if args.quick and variant["model"] == "real-width":
            budget = min(budget, QUICK_REAL_WIDTH_TOKENS)
        request = {**variant, "model_dir": work["models"][variant["model"]], "dataset_dir": work["dataset_dir"],
                   "max_new_tokens": budget, "repeats": args.repeats, "device": args.device}
        try:
            rows.append(run_child(__file__, [json.dumps(request)], line({**variant, "error": ""}).strip()))
        except Exception as error:  # one variant failing (out of memory, no compiler) costs only itself
            rows.append({**variant, "error": " ".join(str(error).split())[-200:]})
        print(line(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as out:
                json.dump(rows, out, indent=1)
    for model in ("demo", "real-width"):
        for constrained in (False, True):
            ratio = speedup(rows, model, constrained)
            if ratio is not None:
                print(f"{model}, {'constrained' if constrained else 'free'}, adapter unmerged: the compiled path "
                      f"x{ratio:.2f} today's speed per step")
    for model in ("demo", "real-width"):
        for path in ("today", "compiled"):
            pair = {row.get("mask") or "ahead": row["ms_per_step"] for row in rows if row["model"] == model
                    and row["path"] == path and row["constrained"] and row["adapter"] == "unmerged" and "error" not in row}
            if len(pair) == 2:
                print(f"{model}, {path}: the schema's mask filled ahead in a thread x{pair['at-step'] / pair['ahead']:.2f} "
                      "the speed per step of the mask made at the step")
    ratio = speedup(rows, "real-width")
    print(f"decode_speedup={'n/a' if ratio is None else f'{ratio:.2f}'}")


if __name__ == "__main__":
    main()
