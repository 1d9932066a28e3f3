"""The one call a lent GPU gets: the script as a user runs it, then the real-width memory, lever, generation
and speed figures. Every part is capped in time, prints its line as it ends and is saved at once.

    bash benchmarks/gpu_wheels.sh                              # here, once: ~30 MB of wheels in .whl/
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --smoke   # here: every part on the CPU, ~4 min

then the device tool's `run` with carry [".whl"], timeout_s 600 and this command (docs/gpu-check.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
    .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; nvidia-smi --query-gpu=name,memory.total,
    driver_version --format=csv; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --work-dir /tmp/gpu_check
    2>&1 | tee $OUT/gpu_check.log

Parts, in this order (the most valuable first; `--quick` runs demo, real-width-lora, predict, merge and resume):

  the script (benchmarks/gpu_check_script.py says what each checks): demo, real-width-lora, qlora,
    checkpointing, freeze-vision, predict, merge, resume;
  memory-lora-224: (a) one step's `torch.cuda.max_memory_allocated()` (AdamW's state made by one real step
    before it, the gradients held, as under accumulation) against paligemma_json/memory.py's `.allocated`,
    and the peak reserved against `.total`, batch 2, without and with gradient checkpointing; (d) tokens/s
    and MFU of LoRA training steps (optimizer included), batch 8, label-only loss;
  memory-full-224: a full fine-tune, batch 1; generation: (c) 8 images x 256 new tokens (`min_new_tokens`),
    what `output_logits=True` confidence, the `ChosenTokenProbabilities` recorder and none add above the
    weights, and the JSON Schema constraint's cost per step with a synthetic 257,152-token tokenizer;
  memory-qlora-448 (if bitsandbytes imports); memory-levers-448: (b) logits at every position against the
    label-only loss, and checkpointing: peak memory and median step time (CUDA events); memory-liger-448:
    Liger's fused linear cross-entropy, if liger_kernel imports (liger-kernel 0.8.5 did not work with
    transformers 5.24: reported as skipped with its error, costing that part alone).

The memory parts use PaliGemma 2 3B at full depth (26 text, 27 vision layers; benchmarks/real_width.py's
`saved_model`, random weights, built on the GPU and saved once per resolution), loaded through the script's
`load_model` and trained through its Trainer's `training_step` (bf16 autocast), each part in a process of its
own. `--smoke`: 1 text and 1 vision layer, 224 px only, batch 1, 1 image x 4 new tokens, no full fine-tune
(its fp32 weights, gradients and AdamW state of the 257k embedding alone pass 8 GiB); perf_counter for times,
memory "n/a".

Reading the result: a line `part NAME: ok|failed|skipped (N s): reason figures` per part, as it ends; the
memory rows under the table header as they are measured; the whole table, the levers and a summary last.
$OUT (or the work dir) gets gpu_check.json (rewritten after every part) and script_runs.log (the end of
each script run's output). `--budget-s` (480 on a GPU) caps the whole check: parts left when it runs out
are reported as skipped, so the call ends inside the device tool's 600 s.
"""

import argparse
import gc
import importlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# bitsandbytes warns on every import that an optional CPU kernel is missing (the script says why it is muted)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402

from paligemma_json.decoding import FastDecoding, compile_counts, stop_on_recompiles  # noqa: E402
from paligemma_json.architecture import architecture, image_tokens, paligemma2_config  # noqa: E402
from paligemma_json.memory import GIB, TrainingSetting, estimate  # noqa: E402
from paligemma_json.speed import mfu, peak_flops  # noqa: E402
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

# liger-kernel 0.8.5 (the newest on the index in 2026-12) against transformers 5.24 on an H200 (docs/gpu-check.md).
KNOWN_LIGER_FAILURE = "'BaseModelOutputWithPooling' object has no attribute 'numel'"


def liger_failure(error: Exception) -> str:
    """Why the Liger variant was skipped: the versions that do not work together, and the error."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        liger_version = version("liger-kernel")
    except PackageNotFoundError:
        liger_version = "(version unknown)"
    known = (" - known: its PaliGemma patch expects a tensor where transformers 5 returns a model output"
             if KNOWN_LIGER_FAILURE in str(error) else "")
    return (f"incompatible: liger-kernel {liger_version} with transformers "
            f"{importlib.import_module('transformers').__version__}: {type(error).__name__}: {str(error)[:160]}{known}")


def failure(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error)[:160]}"


def apply_liger(model, mode: str) -> None:
    liger = importlib.import_module("liger_kernel.transformers")
    liger.apply_liger_kernel_to_paligemma(model=model.get_base_model() if mode != "full" else model)


def train_model(mode: str, image_size: int, variants: list[dict], args, on_row=lambda row: None) -> list[dict]:
    """One loaded model, its variants in order (checkpointing and Liger change the model: last). A variant
    that fails is reported as skipped with its reason, and the next one still runs; `on_row` gets each row
    as soon as it is measured."""
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
        try:
            row.update(measure_variant(model, trainer, wrapped, optimizer, dtype, mode, variant, args))
            row.update(predicted(mode, image_size, variant["batch"], variant["checkpointing"], variant["label_only"],
                                 args.layers))
        except Exception as error:  # out of memory, a Liger or version mismatch: the other variants still report
            row["skipped"] = liger_failure(error) if variant.get("liger") else failure(error)
            optimizer.zero_grad(set_to_none=False)
            release()
        results.append(row)
        on_row(row)
    release(optimizer, trainer, wrapped, model)
    return results


def measure_variant(model, trainer, wrapped, optimizer, dtype, mode: str, variant: dict, args) -> dict:
    """One variant's first step (its peak memory), then its timed steps where asked."""
    if variant.get("liger"):  # it patches classes too: the plan gives it a model of its own, last
        apply_liger(model, mode)
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
    row = {}
    before = fresh_peak()
    row["first_step_s"] = timed(step)
    row["allocated_before"] = before if CUDA else None
    row["peak_allocated"], row["peak_reserved"] = peaks()
    if variant.get("timed"):
        for _ in range(args.warmup):
            step()
        row["step_s"] = statistics.median(timed(step) for _ in range(args.repeats))
    if variant.get("speed"):
        row.update(speed(model.config, inputs, row["step_s"], mode != "full"))
    return row


def speed(config, inputs: dict, step_s: float, use_lora: bool) -> dict:
    """Tokens/s and MFU of the timed steps: every token is real (the synthetic batch has no padding)."""
    batch, tokens = inputs["input_ids"].shape
    head_positions = inputs["logits_to_keep"].shape[1]  # the label-only loss's, per sample
    import finetune_paligemma2 as flow  # the adapters real_width.load gave the model
    peak = peak_flops(torch.cuda.get_device_name(), torch.bfloat16) if CUDA else None
    result = {"tokens_per_s": batch * tokens / step_s, "samples_per_s": batch / step_s,
              "lm_head_positions": head_positions, "peak_flops": peak}
    if peak is not None:
        result["mfu"] = mfu(config, result["tokens_per_s"], result["samples_per_s"], use_lora, freeze_vision=False,
                            peak_flops=peak, lm_head_positions=head_positions, lora_rank=flow.LORA_RANK,
                            lora_targets=flow.LORA_TARGET_MODULES)
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
    from paligemma_json.demo import make_manifest
    from paligemma_json.schema import infer_schema, with_layout
    rng = random.Random(0)
    records = [make_manifest(rng) for _ in range(50)]
    return with_layout(infer_schema(records), [json.dumps(record) for record in records]), synthetic_tokenizer()


def generation(args, on_row) -> None:
    """Calls `on_row` with each variant's row as it is measured, so a part cut off at its cap keeps them."""
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
    by_name = {}
    added_to = {"constrained": "none", "constrained-ahead": "none", "constrained-fast": "none-fast", "lora": "none",
                "lora-fast": "none-fast"}

    def keep(row):
        if "skipped" in row:
            on_row(row)
            return
        by_name[row["variant"]] = row["s_per_step"]
        base = added_to.get(row["variant"])
        if base in by_name:  # what the constraint or the adapter adds to the step it is added to
            row["extra_s_per_step"] = row["s_per_step"] - by_name[base]
            row["extra_share"] = row["extra_s_per_step"] / by_name[base]
        on_row(row)
    for name, extra in () if args.goals else (("none", {}), ("kept_logits", {"output_logits": True}), ("recorded", {})):
        keep(run(name, **extra))
    schema, tokenizer = schema_and_tokenizer()
    constraint = JsonSchemaConstraint(schema, tokenizer)

    def constrained(name, ahead=True, **extra):  # ahead: the next mask filled in a thread during the forward
        mask = constraint.logits_processor()
        row = run(name, min_new_tokens=0, logits_processor=[mask], stopping_criteria=mask.masks_ahead() if ahead
                  else None, **extra)
        row["tokenizer"] = f"synthetic, {len(tokenizer):,} tokens"
        return row
    fast = FastDecoding(True, compiled=CUDA, devices=("cuda", "cpu"))  # --smoke: the static cache alone

    def fast_run(name, make_row, **extra):
        """A first run at the same shapes (the compilation: what a user waits, `warmup_s`), then the timed one;
        both under stop_on_recompiles, so a step compiled again and again fails this row alone, within seconds."""
        settings = lambda: fast.generate_kwargs(model, args.images, len(prompt) + args.new_tokens)  # noqa: E731
        before, started = compile_counts(), time.perf_counter()
        try:
            with stop_on_recompiles(True):
                make_row(name, **extra, **settings())
                warmup, middle = time.perf_counter() - started, compile_counts()
                row = make_row(name, **extra, **settings())
        except Exception as error:  # the recompile limit, CUDA graphs failing: this row, not the part
            torch._dynamo.reset()
            return {"variant": name, "skipped": failure(error), "path": f"fell back: {failure(error)}"}
        after = compile_counts()
        graphs = middle["graphs"] - before["graphs"]
        return {**row, "warmup_s": warmup, "compile_s": middle["compile_s"] - before["compile_s"], "graphs": graphs,
                "recompilations": max(0, graphs - 1) + after["graphs"] - middle["graphs"],
                "cudagraph_skips": after["cudagraph_skips"] - before["cudagraph_skips"] if CUDA else None,
                "path": "compiled step" if CUDA else "static cache, uncompiled"}

    def with_lora():
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj",
                                                                     "up_proj", "down_proj"], init_lora_weights=False,
                                                task_type="CAUSAL_LM")).eval()
    if args.goals:  # the goals' rows only, the fast ones first; today's after, on the same card, for the ratios
        keep(fast_run("none-fast", run))
        keep(fast_run("constrained-fast", constrained))
        model = with_lora()
        keep(fast_run("lora-fast", run))
        with model.disable_adapter():
            keep(run("none"))
            keep(constrained("constrained-ahead"))
        keep(run("lora"))
        release(model)
        return
    keep(constrained("constrained", ahead=False))  # the mask made at the step, as before
    keep(constrained("constrained-ahead"))
    # The decoding issue's goals, today's path and the fast one (paligemma_json/decoding.py): plain greedy,
    # the constraint's cost, and an unmerged LoRA adapter's. Each fast variant is run once untimed first,
    # at the same shapes: that run is the compilation (`warmup_s`), reported apart from ms per step.
    keep(fast_run("none-fast", run))
    keep(fast_run("constrained-fast", constrained))
    model = with_lora()
    keep(run("lora"))
    keep(fast_run("lora-fast", run))
    release(model)


# --- The plan and the report -------------------------------------------------------------------------

def variant(batch, label_only=True, checkpointing=False, section="a", **flags) -> dict:
    return {"section": section, "batch": batch, "label_only": label_only, "checkpointing": checkpointing, **flags}


def plan(smoke: bool, only: str = ""):
    """(part name, what, mode, px, variants); generation's variants are None. Liger patches classes: last."""
    high, b2, b8 = (224, 1, 1) if smoke else (448, 2, 8)
    steps = [("memory-lora-224", "train", "lora", 224,
              [variant(b2), variant(b8, section="d", timed=True, speed=True, optimizer=True),
               variant(b2, checkpointing=True)]),
             ("memory-full-224", "train", "full", 224, [] if smoke else [variant(1)]),
             ("generation", "generation", None, 224, None),
             (f"memory-qlora-{high}", "train", "qlora", high, [variant(b2)]),
             (f"memory-levers-{high}", "train", "lora", high,
              [variant(b2, label_only=False, section="b", timed=True), variant(b2, section="ab", timed=True),
               variant(b2, checkpointing=True, section="ab", timed=True)]),
             (f"memory-liger-{high}", "train", "lora", high,
              [variant(b2, label_only=False, section="b", timed=True, liger=True)])]
    return [step for step in steps if not only or only in (step[0], step[1], step[2])]


def gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def error(measured, guess) -> str:
    return "n/a" if measured is None or guess is None else f"{guess / measured - 1:+.1%}"


TABLE_HEADER = (f"{'sec':3} {'setting':42} {'peak alloc':>10} {'pred':>6} {'err':>7} {'reserved':>8} {'pred':>6} "
                f"{'err':>7} {'step s':>7} {'tok/s':>7} {'MFU':>6}")


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


def generation_line(g: dict) -> str:
    if "skipped" in g:
        return f"c   generate {g['variant']:12} skipped: {g['skipped']}"
    extra = ""
    if "extra_s_per_step" in g:
        extra = (f", {g['extra_s_per_step'] * 1e3:+.2f} ms/step ({g['extra_share']:+.0%}) over "
                 f"{'none-fast' if g['variant'].endswith('-fast') else 'none'}")
    extra += f" ({g['tokenizer']})" if "tokenizer" in g else ""
    if "warmup_s" in g:  # the compilation apart: its wall time, torch's compile seconds, what it compiled
        skips = "" if g.get("cudagraph_skips") is None else f", {g['cudagraph_skips']} CUDA-graph skips"
        extra += (f"; compiled in a first run of {g['warmup_s']:.1f} s ({g.get('compile_s', 0):.1f} s compiling, "
                  f"{g.get('graphs', 0)} graphs, {g.get('recompilations', 0)} recompilations{skips}; {g['path']})")
    return (f"c   generate {g['variant']:12} {g['images']} images x {g['steps']} steps: "
            f"{gib(g['added_above_weights'])} GiB above the weights, {g['s_per_step'] * 1e3:.2f} ms/step{extra}")


def lever_lines(training: list[dict]) -> list[str]:
    """Part 3's ratios at the highest resolution, against the label-only loss without checkpointing."""
    timed_rows = [r for r in training if r["mode"] == "lora" and "step_s" in r and "skipped" not in r]
    if not timed_rows:  # `--only generation`, or every timed variant failed
        return []
    high = max(row["image_size"] for row in timed_rows)
    rows = {(r["label_only"], r["checkpointing"], bool(r.get("liger"))): r for r in timed_rows
            if r["image_size"] == high}
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
    print(TABLE_HEADER)
    for row in training:
        print(training_line(row))
    for g in generated:
        print(generation_line(g))
    for line in lever_lines(training):
        print(line)
    if any("estimate" in row for row in training):
        print("no predictions: paligemma_json/memory.py's COEFFICIENTS are not filled in yet")


# --- One memory part, in a process of its own --------------------------------------------------------

def write_json(data, path: str) -> None:
    """Whole or not at all: a check killed at its limit leaves the last complete file."""
    with open(path + ".tmp", "w") as out:
        json.dump(data, out, indent=1, default=str)
    os.replace(path + ".tmp", path)


def memory_part(name: str, args) -> None:
    """Measures one step of the plan; prints each row as it is measured and keeps `args.rows_file` current."""
    (_, what, mode, image_size, variants), = [step for step in plan(args.smoke) if step[0] == name]
    rows = {"training": [], "generation": []}

    def on_row(row, kind="training"):
        rows[kind].append(row)
        print(training_line(row) if kind == "training" else generation_line(row), flush=True)
        write_json(rows, args.rows_file)
    if what == "generation":
        generation(args, lambda row: on_row(row, "generation"))
        return
    needs = "bitsandbytes" if mode == "qlora" else "liger_kernel.transformers" if variants[-1:] and \
        variants[-1].get("liger") else None
    if needs and optional(needs) is None:
        for v in variants:
            on_row({"mode": mode, "image_size": image_size, **v, "skipped": f"not installed ({needs})"})
        return
    if not variants:
        return
    with torch.device("cuda" if CUDA else "cpu"):  # a 3B's random init is minutes on a CPU
        saved_model("3b", image_size, *args.layers, args.work_dir)
    try:
        train_model(mode, image_size, variants, args, on_row)
    except Exception as error:  # loading or the warm-up step: no variant could run
        for v in variants[len(rows["training"]):]:
            on_row({"mode": mode, "image_size": image_size, **v, "skipped": failure(error)})


def memory_status(name: str, rows: dict, smoke: bool) -> tuple[str, str]:
    """(ok / failed / skipped, why) of a memory part from its rows."""
    found = rows["training"] + rows["generation"]
    if not found:
        return ("skipped", "--smoke: a full fine-tune's fp32 weights, gradients and AdamW state of the 257k "
                "embedding alone pass 8 GiB") if smoke and "full" in name else ("failed", "no rows measured")
    reasons = [row["skipped"] for row in found if "skipped" in row]
    failed = [reason for reason in reasons if reason.startswith("failed")]
    if failed:
        return "failed", failed[0]
    if len(reasons) == len(found):
        return "skipped", reasons[0]
    return "ok", f"{len(found) - len(reasons)} rows" + (f", {len(reasons)} skipped" if reasons else "")


# --- The whole check: every part capped, each reported as it ends ------------------------------------

class Report:
    """A line per part as it ends, and the JSON rewritten after each part, so a check cut off at the device
    tool's limit still returns what it measured."""

    def __init__(self, path: str, header: dict):
        self.path, self.data = path, {**header, "parts": [], "training": [], "generation": []}

    def part(self, name: str, status: str, seconds: float, figures: dict | None = None, reason: str = "") -> None:
        entry = {"name": name, "status": status, "seconds": round(seconds, 1), "figures": figures or {},
                 "reason": reason}
        self.data["parts"].append(entry)
        print(part_line(entry), flush=True)
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(time.time() - self.data["started"], 1)
        write_json(self.data, self.path)


def shown(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def part_line(entry: dict) -> str:
    figures = {key: value for key, value in entry["figures"].items() if key != "printed"}
    text = f"part {entry['name']}: {entry['status']} ({entry['seconds']:.0f} s)"
    if entry["reason"]:
        text += f": {entry['reason']}"
    if figures:
        text += " " + " ".join(f"{key}={shown(value)}" for key, value in figures.items())
    return "\n".join([text] + [f"    | {line}" for line in entry["figures"].get("printed", [])])


def device_name() -> str:
    """From nvidia-smi: asking torch would open a CUDA context in this process, whose memory the measured
    runs would then lack."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        names = ""
    return names or "CPU"


def run_capped(command: list[str], cap: float, environment: dict | None = None, log_path: str = "") -> int | str:
    """Runs `command` with this process's output (its rows print as they come), killed whole at `cap`;
    with `log_path`, its whole output (torch's logs too) is also kept there."""
    import threading
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if log_path else {}
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, env=env, **piped)
    copier = None
    if log_path:
        def copy():
            with open(log_path, "w") as log:
                for line in process.stdout:
                    log.write(line)
                    if not line.startswith(("V", "I", "W", "[")) or "torch" not in line:  # torch's logs: the file only
                        print(line, end="", flush=True)
        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
    try:
        return process.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"
    finally:
        if copier is not None:
            copier.join(timeout=10)


def run_memory_part(name: str, cap: float, args, report: Report) -> None:
    (_, _, _, _, variants), = [step for step in plan(args.smoke) if step[0] == name]
    if variants == []:  # nothing to measure here (--smoke's full fine-tune): no process to start
        status, reason = memory_status(name, {"training": [], "generation": []}, args.smoke)
        report.part(name, status, 0, reason=reason)
        return
    rows_file = os.path.join(args.work_dir, f"{name}.rows.json")
    if os.path.exists(rows_file):
        os.remove(rows_file)
    started = time.time()
    command = [sys.executable, os.path.abspath(__file__), "--memory-part", name, "--rows-file", rows_file,
               "--work-dir", args.work_dir] + (["--smoke"] if args.smoke else []) + (["--goals"] if args.goals else [])
    logged = {"environment": {"TORCH_LOGS": GOALS_TORCH_LOGS}, "log_path": os.path.join(args.logs_dir, f"{name}.log")} \
        if args.goals else {}
    returncode = run_capped(command, cap, **logged)
    rows = json.load(open(rows_file)) if os.path.exists(rows_file) else {"training": [], "generation": []}
    report.data["training"] += rows["training"]
    report.data["generation"] += rows["generation"]
    status, reason = memory_status(name, rows, args.smoke)
    if returncode == "timeout":
        measured = len(rows['training'] + rows['generation'])
        status, reason = "failed", f"cut off at its cap of {cap:.0f} s after {measured} rows"
    elif returncode != 0:
        status, reason = "failed", f"exited {returncode} (its output is above)"
    report.part(name, status, time.time() - started, reason=reason)


def run_script_part(part, cap: float, context, report: Report) -> None:
    from gpu_check_script import Skipped
    started = time.time()
    context.deadline = started + cap
    try:
        figures = part.run(context)
    except Skipped as why:
        report.part(part.name, "skipped", time.time() - started, reason=str(why))
    except Exception as error:  # the part's own check failed, or its run crashed or hit its cap
        report.part(part.name, "failed", time.time() - started, reason=f"{type(error).__name__}: {str(error)[:400]}")
    else:
        report.part(part.name, "ok", time.time() - started, figures)


def selected_parts(args) -> list[tuple[str, object, float]]:
    """(name, script part or None for a memory part, cap in seconds), in the order they run."""
    import gpu_check_script
    scale = SMOKE_CAP_SCALE if args.smoke else 1
    if args.goals:
        return [(part.name, part if part.run else None, cap * scale) for part, cap, _ in goals_plan()]
    parts = [] if args.only else [(part.name, part, part.cap_s * scale) for part in gpu_check_script.PARTS
                                  if part.quick or not args.quick]
    if not args.quick:
        parts += [(step[0], None, MEMORY_CAP_S.get(step[0], MEMORY_CAP_S["default"]) * scale)
                  for step in plan(args.smoke, args.only)]
    if args.parts:  # in the order given: a short loan runs what matters most first
        wanted = args.parts.split(",")
        unknown = set(wanted) - {name for name, _, _ in parts}
        if unknown:
            sys.exit(f"gpu_check: no part {', '.join(sorted(unknown))}; the parts: {', '.join(n for n, _, _ in parts)}")
        parts = sorted((entry for entry in parts if entry[0] in wanted), key=lambda entry: wanted.index(entry[0]))
    return parts


def run_check(args) -> Report:
    from gpu_check_script import Context
    out = os.environ.get("OUT") or args.work_dir
    started = time.time()
    device = device_name() if not args.smoke else "CPU (--smoke)"
    report = Report(os.path.join(out, "gpu_check.json"), {
        "device": device, "smoke": args.smoke, "quick": args.quick, "started": started, "torch": torch.__version__,
        "transformers": importlib.import_module("transformers").__version__, "budget_s": args.budget_s})
    context = Context(smoke=args.smoke, work_dir=args.work_dir, log_path=os.path.join(out, "script_runs.log"))
    if args.goals:  # each run's whole output, torch's recompile and CUDA-graph logs in it, comes back
        args.logs_dir = context.logs_dir = os.path.join(out, "logs")
        os.makedirs(args.logs_dir, exist_ok=True)
        context.environment = {"TORCH_LOGS": GOALS_TORCH_LOGS}
        # One inductor cache for every part: whether it spares a later part its compilation, each run's
        # decoding.jsonl says (`inductor_cache_hits`, `compile_s`).
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(args.work_dir, "inductor-cache"))
        for part, cap, expected in goals_plan():
            print(f"goals part {part.name}: expected {expected} s on an H100/H200, cap {cap} s", flush=True)
    print(f"gpu_check on {device}: {'smoke, ' if args.smoke else ''}{'quick, ' if args.quick else ''}"
          f"budget {args.budget_s:.0f} s; work dir {args.work_dir}; results in {report.path}", flush=True)
    table_printed = False
    for name, part, cap in selected_parts(args):
        left = args.budget_s - (time.time() - started)
        if left < MIN_PART_S:
            report.part(name, "skipped", 0, reason=f"out of time: {left:.0f} s of the check's --budget-s left")
            continue
        cap = min(cap, left)
        print(f"[{time.time() - started:5.0f} s] part {name} (cap {cap:.0f} s)", flush=True)
        if part is not None:
            run_script_part(part, cap, context, report)
            continue
        if not table_printed:  # the memory rows print under it as they are measured
            print(TABLE_HEADER, flush=True)
            table_printed = True
        run_memory_part(name, cap, args, report)
    if (report.data["training"] or report.data["generation"]) and not args.goals:
        print_table(report.data["training"], report.data["generation"], device)
    if args.goals:
        report.data["goals"] = judge_goals(report.data, args.smoke)
        print_goals(report.data["goals"], device)
    summary = {status: [p["name"] for p in report.data["parts"] if p["status"] == status]
               for status in ("ok", "skipped", "failed")}
    print("summary: " + "; ".join(f"{status} {len(names)}: {', '.join(names)}" for status, names in summary.items()
                                  if names))
    report.save()
    print(f"wall time {time.time() - started:.0f} s", flush=True)
    return report


SMOKE_CAP_SCALE = 5  # a CPU core is far slower than a GPU: the caps grow with it
GOALS_TORCH_LOGS = "recompiles,cudagraphs"  # torch's own word on each recompilation and CUDA-graph skip


def goals_plan() -> list[tuple[object, int, int]]:
    """--goals: (part, cap s, expected s on an H100/H200), in order of value; the caps sum to at most 540 s."""
    from gpu_check_script import GOALS, GOALS_AFTER, Part
    generation_part = Part("generation", None, 150, False)  # 6 rows of 256 steps at full depth, 2 compilations
    return [(part, part.cap_s, expected) for part, expected in GOALS] + [(generation_part, 150, 90)] + \
        [(part, part.cap_s, expected) for part, expected in GOALS_AFTER]


# --- The goals table ------------------------------------------------------------------------------

GOAL_ROWS = [  # row, setting, baseline, goal (the decoding issue's table)
    ("plain greedy", "3B full depth, 224 px, batch 8, 256 tokens, 257k vocabulary", "35.9 ms/step (H200, dynamic cache)",
     "<= 12 ms/step"),
    ("schema constraint", "as above", "+6.3 ms (+14%), mask made at the step", "<= +10%"),
    ("unmerged LoRA r8", "as above", "not measured alone", "<= +10%"),
    ("the test step", "real widths, 448 px, LoRA, 24 pages, 218 tokens, every pass the run makes, compilation "
     "included", "80 s (constrained and free, dynamic cache)", "<= 20 s"),
    ("default run", "projected: 20 epochs x 150 pages at the run's evaluation schedule, all decoding",
     "decoding > training", "decoding < training"),
    ("bf16 agreement", "the demo's 24 test pages, both paths", "-",
     "identical rows stated; every constrained row fits the schema"),
    ("training MFU", "real widths, 448 px, LoRA, the script's own line", "19.8% printed", "reported"),
]


def judge_goals(data: dict, smoke: bool) -> list[dict]:
    """Each goal row: what was measured, met / not met / not measured (why), and the path that produced it
    (from decoding.jsonl or the row's own count of compilations, never from the printed output)."""
    parts = {part["name"]: part for part in data["parts"]}
    generation_rows = {row["variant"]: row for row in data["generation"]}

    def missing(part_name):
        part = parts.get(part_name)
        return "not run" if part is None else f"part {part_name} {part['status']}: {part['reason'][:120]}"

    def judged(measured, met, path, source):
        if smoke:
            return measured, "not measured (CPU)", path
        if measured is None:
            return None, f"not measured ({missing(source)})", path
        if path is None or not str(path).startswith("compiled step"):
            return measured, f"not met (the fast path did not produce it: {path})", path
        return measured, "met" if met else "not met", path

    def generation_goal(variant, limit, share):
        row = generation_rows.get(variant)
        if row is None or "skipped" in row:
            return judged(None, False, row and row.get("path"), "generation")
        if share:
            if "extra_share" not in row:
                return judged(None, False, row.get("path"), "generation")
            return judged(f"{row['extra_s_per_step'] * 1e3:+.2f} ms ({row['extra_share']:+.0%})",
                          row["extra_share"] <= limit, row["path"], "generation")
        return judged(f"{row['s_per_step'] * 1e3:.1f} ms/step", row["s_per_step"] * 1e3 <= limit, row["path"],
                      "generation")

    run = parts.get("goals-run", {}).get("figures", {})
    decode = parts.get("decoding", {}).get("figures", {})
    agreement = parts.get("bf16-agreement", {}).get("figures", {})
    results = [generation_goal("none-fast", 12, False), generation_goal("constrained-fast", 0.10, True),
               generation_goal("lora-fast", 0.10, True)]
    if "test_step_s" in run:  # the passes' wall time, and the compilation wherever the run paid it
        paid_before = run["run_compile_s"] - run["test_compile_s"]
        total = run["test_step_s"] + paid_before
        paths = run["test_paths"]
        results.append(judged(f"{total:.1f} s ({run['test_step_s']:.1f} s decoding the test set + {paid_before:.1f} s "
                              "compiling at validation)", total <= 20, paths[0] if len(paths) == 1 else paths,
                              "goals-run"))
    else:
        results.append(judged(None, False, None, "goals-run"))
    if "default_run_decoding_fast_s" in decode:
        results.append(judged(f"decoding {decode['default_run_decoding_fast_s']} s, training "
                              f"{decode['default_run_training_s']} s", decode["default_run_decoding_fast_s"] <
                              decode["default_run_training_s"], decode["fast_path"], "decoding"))
    else:
        results.append(judged(None, False, decode.get("fast_path"), "decoding"))
    if "constrained_fit_schema" in agreement:
        pages = agreement["pages"]
        fits = agreement["constrained_fit_schema"]
        path = agreement.get("constrained_compiled_path")
        results.append(judged(f"identical rows: free {agreement['free_identical']}/{pages}, constrained "
                              f"{agreement['constrained_identical']}/{pages}; fitting the schema: today "
                              f"{fits['today']}/{pages}, compiled {fits['compiled']}/{pages}",
                              min(fits.values()) == pages, path, "bf16-agreement"))
    else:
        results.append(judged(None, False, None, "bf16-agreement"))
    mfu_line = next((line for line in run.get("printed", []) if line.startswith("MFU")), None)
    mfu_path = "training (no decoding)" if mfu_line else None
    if smoke:
        results.append((mfu_line, "not measured (CPU)", mfu_path))
    else:
        results.append((mfu_line, "met (reported)" if mfu_line else f"not measured ({missing('goals-run')})", mfu_path))
    return [{"row": row, "setting": setting, "baseline": baseline, "goal": goal, "measured": measured,
             "status": status, "path": path}
            for (row, setting, baseline, goal), (measured, status, path) in zip(GOAL_ROWS, results)]


def print_goals(goals: list[dict], device: str) -> None:
    print(f"\n== goals on {device} ==")
    print("| row | measured | goal | status | path |\n|---|---|---|---|---|")
    for goal in goals:
        print(f"| {goal['row']} | {goal['measured'] or '-'} | {goal['goal']} | {goal['status']} | {goal['path'] or '-'} |")
# One memory part: a 3B model built or loaded, a few steps; the H200 needed under a minute. Generation runs
# eleven generate() calls of 256 steps at about 40-50 ms a step, and three compilations.
MEMORY_CAP_S = {"default": 120, "generation": 360}
MIN_PART_S = 20  # less left than this: a part could not even start its model


def prepare_demo(source: str = "") -> str:
    """The demo run --goals' bf16 agreement decodes, in .whl/demo-run (carried with the wheels): `source`'s
    final/, demo-dataset/test/ and run_settings.json, or a --demo trained here first (a few minutes on a CPU)."""
    import shutil
    from gpu_check_script import CARRIED_DEMO, SCRIPT
    if not source:
        source = os.path.join(tempfile.mkdtemp(prefix="demo_"), "out")
        subprocess.run([sys.executable, SCRIPT, "--demo", "--output-dir", source, "--report-to", "none"], check=True,
                       cwd=ROOT)
    shutil.rmtree(CARRIED_DEMO, ignore_errors=True)
    for name in ("final", os.path.join("demo-dataset", "test")):  # the model, and the pages it decodes
        shutil.copytree(os.path.join(source, name), os.path.join(CARRIED_DEMO, name))
    shutil.copy(os.path.join(source, "run_settings.json"), CARRIED_DEMO)
    size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(CARRIED_DEMO)
               for name in names)
    print(f"prepared: {CARRIED_DEMO} ({size / 2 ** 20:.1f} MiB), from {source}")
    return CARRIED_DEMO


def main(argv=None) -> None:
    global CUDA
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU, at 1 text + 1 vision layer")
    parser.add_argument("--quick", action="store_true", help="the script's demo, real-width LoRA, predict, merge "
                        "and resume only")
    parser.add_argument("--work-dir", default="", help="models and runs go here (default: a temp dir)")
    parser.add_argument("--only", default="", help="memory parts only: lora, full, qlora, generation or a part name")
    parser.add_argument("--parts", default="", help="comma-separated part names to run (default: all)")
    parser.add_argument("--budget-s", type=float, default=0, help="the whole check's time; parts past it are "
                        "skipped, saying so (default: 480 on a GPU, 3600 on --smoke)")
    parser.add_argument("--goals", action="store_true", help="only what the decoding goals table needs, in order of "
                        "value, each part capped (caps sum to 530 s); ends with the goals table")
    parser.add_argument("--prepare-demo", action="store_true", help="here, before a loan: train the demo (or take "
                        "--demo-from's) into .whl/demo-run, carried with the wheels, for --goals' bf16 agreement")
    parser.add_argument("--demo-from", default="", help="with --prepare-demo: a finished --demo OUTPUT_DIR to copy")
    parser.add_argument("--memory-part", default="", help=argparse.SUPPRESS)  # a child: one memory part
    parser.add_argument("--rows-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_demo:
        prepare_demo(args.demo_from)
        return
    CUDA = torch.cuda.is_available() and not args.smoke
    if not CUDA and not args.smoke:
        sys.exit("gpu_check: no CUDA device here; run with --smoke to check its code paths on the CPU")
    args.layers = (1, 1) if args.smoke else (None, None)  # None: the full depth
    args.warmup, args.repeats = (1, 1) if args.smoke else (2, 5)
    args.images, args.new_tokens = (1, 4) if args.smoke else (8, 256)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(args.work_dir, exist_ok=True)
    args.budget_s = args.budget_s or (3600 if args.smoke else 540 if args.goals else 480)
    args.logs_dir = os.path.join(args.work_dir, "logs")
    if args.memory_part:
        memory_part(args.memory_part, args)
        return
    run_check(args)


if __name__ == "__main__":
    main()
