"""Issue 16, part 7: the real-width memory, lever, generation and speed figures checked on a lent GPU.

PaliGemma 2 3B at full depth (26 text, 27 vision layers; benchmarks/real_width.py's `saved_model`,
random weights, built on the GPU and saved once per resolution), loaded through the script's
`load_model` and trained through its Trainer's `training_step` (bf16 autocast), as real_width does:

 (a) one step's `torch.cuda.max_memory_allocated()` (AdamW's state made by one real step before it, the
     gradients held, as under accumulation) against paligemma_json/memory.py's `.allocated`, and the
     peak reserved against `.total`: LoRA at 224 and 448 px, batch 2, without and with gradient
     checkpointing; a full fine-tune at 224, batch 1; QLoRA at 448 if bitsandbytes imports;
 (b) 448 px, batch 2: logits at every position against the label-only loss, checkpointing, and Liger's
     fused linear cross-entropy (if liger_kernel imports): peak memory and median step time (CUDA events);
 (c) generation, 8 images x 256 new tokens (`min_new_tokens`): what it adds above the weights with
     `output_logits=True` confidence, the `ChosenTokenProbabilities` recorder, and none; then the
     JSON Schema constraint with a synthetic 257,152-token tokenizer, its cost per generated step;
 (d) tokens/s and MFU of LoRA training steps (optimizer included) at 224 px, batch 8, label-only loss.

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --smoke    # the same paths on a CPU, 1+1 layers, ~2 min, ~5 GiB

`--smoke`: 1 text and 1 vision layer, 224 px only, batch 1, 1 image x 4 new tokens, no full fine-tune
(its fp32 weights, gradients and AdamW state of the 257k embedding alone pass 8 GiB); perf_counter for
times, memory "n/a". Results as JSON in $OUT/gpu_check.json when $OUT is set.

On the device tool (prepare the wheels here once, ~21 MiB: the GPU image has transformers 5.17 and
lacks llguidance and rapidfuzz):

    mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 -d .whl \
      transformers==5.24.0 peft==0.21.2 llguidance==1.9.1 rapidfuzz==3.14.6

then `run` with carry [".whl"], timeout_s 480, and this command (one line):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; nvidia-smi --query-gpu=name,memory.total
    --format=csv; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --work-dir /tmp/gpu_check 2>&1
    | tee $OUT/gpu_check.log

QLoRA needs bitsandbytes (~41 MiB): measure it in a call of its own (shared/DECISIONS.md), carrying
its wheel beside the others and adding `--only qlora`. A part that fails (out of memory, a
version mismatch) is reported as skipped with its reason, and the others still run.
"""

import argparse
import gc
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from paligemma_json.memory import GIB, TrainingSetting, architecture, estimate  # noqa: E402
from paligemma_json.speed import image_tokens, mfu, paligemma2_config, peak_flops  # noqa: E402
from paligemma_json.training import enable_gradient_checkpointing, without_label_only  # noqa: E402
from real_width import load, saved_model, synthetic_batch  # noqa: E402

CUDA = False  # set in main: --smoke, or no GPU, times with perf_counter and reports no memory


def optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def timed(work) -> float:
    """Seconds of `work`, by CUDA events on a GPU (the host does not wait for queued kernels)."""
    if not CUDA:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def fresh_peak() -> int:
    """Starts a peak measurement; returns the bytes allocated now."""
    if not CUDA:
        return 0
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # so that the peak reserved is this step's, not earlier variants' cache
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peaks() -> tuple[int | None, int | None]:
    return (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if CUDA else (None, None)


def predicted(mode: str, image_size: int, batch: int, checkpointing: bool, label_only: bool, layers) -> dict:
    """memory.py's estimate, or why there is none (its COEFFICIENTS not filled in yet)."""
    setting = TrainingSetting(mode=mode, compute="bf16", batch_size=batch, gradient_checkpointing=checkpointing,
                              label_only_loss=label_only)
    try:
        guess = estimate(architecture(paligemma2_config("3b", image_size, *layers)), setting)
    except KeyError as missing:
        return {"estimate": f"n/a: no coefficients for {missing}"}
    return {"predicted_allocated": guess.allocated, "predicted_total": guess.total}


def release(*objects) -> None:
    for thing in objects:
        if hasattr(thing, "accelerator"):
            thing.accelerator.free_memory()
    del objects
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# --- (a), (b), (d): training steps ------------------------------------------------------------------

def train_model(mode: str, image_size: int, variants: list[dict], args) -> list[dict]:
    """One loaded model, its variants in order (checkpointing and Liger change the model: last)."""
    shape = dict(size="3b", image_size=image_size, text_layers=args.layers[0], vision_layers=args.layers[1],
                 mode=mode, compute="bf16", freeze_vision=False, cache_dir=args.work_dir)
    model, trainer, wrapped, dtype = load(shape)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=CUDA or None)
    warm = synthetic_batch(model.config, 1, dtype, True)
    trainer.training_step(wrapped, warm, num_items_in_batch=int((warm["labels"][:, 1:] != -100).sum()))
    optimizer.step()  # AdamW's moments now exist; the gradients stay held, as under accumulation
    results = []
    for variant in variants:
        row = {"mode": mode, "image_size": image_size, **variant}
        if variant.get("liger"):  # it patches classes too: the plan gives it a model of its own, last
            try:
                liger = importlib.import_module("liger_kernel.transformers")
                liger.apply_liger_kernel_to_paligemma(model=model.get_base_model() if mode != "full" else model)
            except Exception as error:  # a Liger release that does not know this transformers
                results.append({**row, "skipped": f"failed: {type(error).__name__}: {str(error)[:120]}"})
                continue
        if variant["checkpointing"]:
            enable_gradient_checkpointing(model)
        inputs = synthetic_batch(model.config, variant["batch"], dtype, variant["label_only"])
        if variant.get("liger"):
            inputs = without_label_only(inputs)  # Liger fuses the head and the loss over every position
        scored = int((inputs["labels"][:, 1:] != -100).sum())

        def step():
            trainer.training_step(wrapped, inputs, num_items_in_batch=scored)
            if variant.get("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
        before = fresh_peak()
        row["first_step_s"] = timed(step)
        row["allocated_before"] = before if CUDA else None
        row["peak_allocated"], row["peak_reserved"] = peaks()
        row.update(predicted(mode, image_size, variant["batch"], variant["checkpointing"], variant["label_only"],
                             args.layers))
        if variant.get("timed"):
            for _ in range(args.warmup):
                step()
            times = [timed(step) for _ in range(args.repeats)]
            row["step_s"] = statistics.median(times)
        if variant.get("speed"):
            row.update(speed(model.config, inputs, row["step_s"], mode != "full"))
        results.append(row)
    release(optimizer, trainer, wrapped, model)
    return results


def speed(config, inputs: dict, step_s: float, use_lora: bool) -> dict:
    """Tokens/s and MFU of the timed steps: every token is real (the synthetic batch has no padding)."""
    batch, tokens = inputs["input_ids"].shape
    head_positions = inputs["logits_to_keep"].shape[1]  # the label-only loss's, per sample
    peak = peak_flops(torch.cuda.get_device_name(), torch.bfloat16) if CUDA else None
    result = {"tokens_per_s": batch * tokens / step_s, "samples_per_s": batch / step_s,
              "lm_head_positions": head_positions, "peak_flops": peak}
    if peak is not None:
        result["mfu"] = mfu(config, result["tokens_per_s"], result["samples_per_s"], use_lora, freeze_vision=False,
                            peak_flops=peak, lm_head_positions=head_positions)
    return result


# --- (c): generation --------------------------------------------------------------------------------

def kept_logits_probabilities(output, prompt_length: int) -> torch.Tensor:
    """Confidence as it was read before issue 16, from every step's kept logits (greedy)."""
    tokens = output.sequences[:, prompt_length:]
    return torch.stack([torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, step:step + 1]).squeeze(1)
                        for step, logits in enumerate(output.logits)], dim=1).exp()


def schema_and_tokenizer():
    """A pallet-manifest schema (from the demo's generated records) and a synthetic tokenizer of
    PaliGemma 2's size: 257,152 made-up token strings (the real one cannot be downloaded here)."""
    import random

    from grammar_masks import synthetic_tokenizer
    from paligemma_json.constrained import with_layout
    from paligemma_json.demo import make_manifest
    from paligemma_json.schema import infer_schema
    rng = random.Random(0)
    records = [make_manifest(rng) for _ in range(50)]
    return with_layout(infer_schema(records), [json.dumps(record) for record in records]), synthetic_tokenizer()


def generation(args) -> list[dict]:
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma_json.constrained import ChosenTokenProbabilities, JsonSchemaConstraint
    path = saved_model("3b", 224, *args.layers, args.work_dir)
    model = PaliGemmaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                              device_map={"": "cuda" if CUDA else "cpu"}).eval()
    config = model.config
    prompt = [config.image_token_index] * image_tokens(config) + [2] + list(range(1000, 1010)) + [108]
    input_ids = torch.tensor([prompt] * args.images, device=model.device)
    size = config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": torch.zeros_like(input_ids),
              "pixel_values": torch.randn(args.images, 3, size, size, device=model.device, dtype=torch.bfloat16)}
    eos = 1  # Gemma's <eos>, and the synthetic tokenizer's
    forced = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  return_dict_in_generate=True)

    def run(name, **extra):
        recorder = ChosenTokenProbabilities(num_beams=1, eos_token_id=eos) if name == "recorded" else None
        settings = {**forced, **extra}
        if recorder:
            settings["logits_processor"] = [recorder]
        holder = {}

        def work():
            with torch.inference_mode():
                output = model.generate(**inputs, **settings)
                if name == "kept_logits":  # what confidence cost: the probabilities are part of it
                    holder["probabilities"] = kept_logits_probabilities(output, len(prompt))
                elif recorder:
                    holder["probabilities"] = recorder.probabilities(output.sequences)
                holder["output"] = output
        before = fresh_peak()
        seconds = timed(work)
        steps = holder["output"].sequences.shape[1] - len(prompt)
        peak, _ = peaks()
        return {"variant": name, "images": args.images, "steps": steps, "seconds": seconds,
                "s_per_step": seconds / steps, "added_above_weights": None if peak is None else peak - before}

    with torch.inference_mode():  # the first generate pays for kernel loading and allocations
        model.generate(**inputs, **{**forced, "max_new_tokens": 2, "min_new_tokens": 2})
    results = [run("none"), run("kept_logits", output_logits=True), run("recorded")]
    schema, tokenizer = schema_and_tokenizer()
    constraint = JsonSchemaConstraint(schema, tokenizer)
    results.append(run("constrained", min_new_tokens=0, logits_processor=[constraint.logits_processor()]))
    free = results[0]["s_per_step"]
    results[-1]["extra_s_per_step"] = results[-1]["s_per_step"] - free
    results[-1]["tokenizer"] = f"synthetic, {len(tokenizer):,} tokens"
    release(model)
    return results


# --- The plan and the report -------------------------------------------------------------------------

def variant(batch, label_only=True, checkpointing=False, section="a", **flags) -> dict:
    return {"section": section, "batch": batch, "label_only": label_only, "checkpointing": checkpointing, **flags}


def plan(smoke: bool, only: str):
    """(what, mode, px, variants); generation is ("generation", ...). Liger patches classes: last."""
    high, b2, b8 = (224, 1, 1) if smoke else (448, 2, 8)
    steps = [("train", "lora", 224, [variant(b2), variant(b8, section="d", timed=True, speed=True, optimizer=True),
                                     variant(b2, checkpointing=True)]),
             ("train", "full", 224, [] if smoke else [variant(1)]),
             ("generation", None, 224, None),
             ("train", "qlora", high, [variant(b2)]),
             ("train", "lora", high, [variant(b2, label_only=False, section="b", timed=True),
                                      variant(b2, section="ab", timed=True),
                                      variant(b2, checkpointing=True, section="ab", timed=True)]),
             ("train", "lora", high, [variant(b2, label_only=False, section="b", timed=True, liger=True)])]
    return [step for step in steps if not only or step[1] == only or (only == step[0])]


def gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def error(measured, guess) -> str:
    return "n/a" if measured is None or guess is None else f"{guess / measured - 1:+.1%}"


def training_line(r: dict) -> str:
    name = (f"{r['mode']} {r['image_size']}px b{r['batch']} {'label-only' if r['label_only'] else 'all logits'}"
            + (" ckpt" if r["checkpointing"] else "") + (" liger" if r.get("liger") else ""))
    if "skipped" in r:
        return f"{r['section']:3} {name:42} skipped: {r['skipped']}"
    alloc, total = r.get("predicted_allocated"), r.get("predicted_total")
    rate = f"{r['tokens_per_s']:7.0f}" if "tokens_per_s" in r else f"{'':7}"
    utilisation = f"{r['mfu']:.1%}" if "mfu" in r else "n/a" if "tokens_per_s" in r else ""
    return (f"{r['section']:3} {name:42} {gib(r['peak_allocated']):>10} {gib(alloc):>6} "
            f"{error(r['peak_allocated'], alloc):>7} {gib(r['peak_reserved']):>8} {gib(total):>6} "
            f"{error(r['peak_reserved'], total):>7} {r.get('step_s', r['first_step_s']):7.3f} {rate} {utilisation:>6}")


def lever_lines(training: list[dict]) -> list[str]:
    """Part 3's ratios at the highest resolution, against the label-only loss without checkpointing."""
    high = max(row["image_size"] for row in training)
    rows = {(r["label_only"], r["checkpointing"], bool(r.get("liger"))): r for r in training
            if r["mode"] == "lora" and r["image_size"] == high and "step_s" in r and "skipped" not in r}
    base = rows.get((True, False, False))
    if base is None:
        return []
    lines = []
    for key, name in (((False, False, False), "all logits"), ((True, True, False), "checkpointing"),
                      ((False, False, True), "liger")):
        if key in rows:
            other = rows[key]
            memory = ("n/a" if base["peak_allocated"] is None else
                      f"{(other['peak_allocated'] - base['peak_allocated']) / GIB:+.2f} GiB peak")
            lines.append(f"lever {high}px: {name} against label-only: {memory}, "
                         f"step time x{other['step_s'] / base['step_s']:.2f}")
    return lines


def print_table(training: list[dict], generated: list[dict], device: str) -> None:
    print(f"\n== GPU check on {device} (GiB; err = predicted / measured - 1; step s: median after warm-up "
          "where timed, else the measured step) ==")
    print(f"{'sec':3} {'setting':42} {'peak alloc':>10} {'pred':>6} {'err':>7} {'reserved':>8} {'pred':>6} "
          f"{'err':>7} {'step s':>7} {'tok/s':>7} {'MFU':>6}")
    for row in training:
        print(training_line(row))
    for g in generated:
        extra = f", {g['extra_s_per_step'] * 1e3:+.2f} ms/step over free ({g['tokenizer']})" if "tokenizer" in g else ""
        print(f"c   generate {g['variant']:12} {g['images']} images x {g['steps']} steps: "
              f"{gib(g['added_above_weights'])} GiB above the weights, {g['s_per_step'] * 1e3:.2f} ms/step{extra}")
    for line in lever_lines(training):
        print(line)
    if any("estimate" in row for row in training):
        print("no predictions: paligemma_json/memory.py's COEFFICIENTS are not filled in yet")


def main(argv=None) -> None:
    global CUDA
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same paths on a CPU, at 1 text + 1 vision layer")
    parser.add_argument("--work-dir", default="", help="where the random-weight models are saved (default: temp)")
    parser.add_argument("--only", default="", help="one of lora, full, qlora, generation")
    args = parser.parse_args(argv)
    CUDA = torch.cuda.is_available() and not args.smoke
    if not CUDA and not args.smoke:
        sys.exit("gpu_check: no CUDA device here; run with --smoke to check its code paths on the CPU")
    args.layers = (1, 1) if args.smoke else (None, None)  # None: the full depth
    args.warmup, args.repeats = (1, 1) if args.smoke else (2, 5)
    args.images, args.new_tokens = (1, 4) if args.smoke else (8, 256)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    device = torch.cuda.get_device_name() if CUDA else "CPU (--smoke)"
    started, training, generated = time.time(), [], []
    for what, mode, image_size, variants in plan(args.smoke, args.only):
        print(f"[{time.time() - started:5.0f} s] {what} {mode or ''} {image_size}px", flush=True)
        if what == "generation":
            generated = generation(args)
            continue
        needs = "bitsandbytes" if mode == "qlora" else "liger_kernel.transformers" if variants[-1:] and \
            variants[-1].get("liger") else None
        if needs and optional(needs) is None:
            training += [{"mode": mode, "image_size": image_size, **v, "skipped": f"not installed ({needs})"}
                         for v in variants]
            continue
        if variants:
            with torch.device("cuda" if CUDA else "cpu"):  # a 3B's random init is minutes on a CPU
                saved_model("3b", image_size, *args.layers, args.work_dir)
            try:
                training += train_model(mode, image_size, variants, args)
            except Exception as error:  # out of memory, a Liger or version mismatch: the other parts still report
                reason = f"failed: {type(error).__name__}: {str(error)[:160]}"
                print(reason, flush=True)
                training += [{"mode": mode, "image_size": image_size, **v, "skipped": reason} for v in variants]
                release()
    print_table(training, generated, device)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as out:
            json.dump({"device": device, "smoke": args.smoke, "torch": torch.__version__,
                       "transformers": importlib.import_module("transformers").__version__,
                       "wall_s": time.time() - started, "training": training, "generation": generated}, out, indent=1)
    print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
