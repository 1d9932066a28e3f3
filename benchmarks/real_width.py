"""The memory of the real PaliGemma 2 on the GPUs people have, measured at its real widths on a CPU.

    OMP_NUM_THREADS=1 python benchmarks/real_width.py --markdown  # ~15 min on one core, ~12 GiB RAM at most
    OMP_NUM_THREADS=1 python benchmarks/real_width.py --save m.json    # then: --refit m.json (no measuring)

It builds PaliGemma 2 3B and 10B at their real widths (paligemma_json/architecture.py's `paligemma2_config`:
the 257,216-wide embedding, Gemma 2 and SigLIP So400m as published) with only one to three layers, at
random weights, saves it, and loads it the way the script does (`load_model`: a bf16 base under LoRA,
nf4 under QLoRA, fp32 under a full fine-tune). Each point then runs one training step the way the
Trainer does (`training_step` on the model as `accelerator.prepare_model` wraps it: under bf16,
autocast and outputs converted to fp32), on synthetic inputs shaped as `collate_fn` makes them (the image tokens, a 20-token
prompt, a 150-token label), with the gradients of an earlier micro-batch already held, as under
gradient accumulation.

What it measures: the bytes the step allocates above what existed before it (weights, held
gradients), counted by torch's own CPU allocator through the profiler (`profile_memory=True`: every
allocation and free made during the step, so the running sum's maximum is the step's peak). The
peak resident set size would be blurred by the weights, which `from_pretrained` maps from the
safetensors file and pages in during the first forward (measured on the first point: a peak RSS
1.5 GB above the allocator's count, for 1.4 GB of weights), and by malloc keeping freed pages. The
count is exact and repeatable (the same step twice gives the same byte count), so points need no
repeats; on a GPU, `torch.cuda.max_memory_allocated` counts the same kind of thing (live tensor
bytes, before the caching allocator's slack). Weights and held gradients are counted from the
tensors themselves. The models of one saved shape are measured in one process, one after another,
each process after waiting for 14 GiB of free memory (others share this machine).

From the fit points it fits paligemma_json/memory.py's coefficients (see its docstring for the
formula), predicts the points it held out (other depths, batches, resolutions, the 10B's widths,
checkpointing, a frozen vision tower, QLoRA, a full fine-tune, fp32 compute) and prints the error of
each, then the table of full-depth estimates for the cards people have. Its last line is
`fit_model_error=<x>`: the largest relative error of the predicted activation bytes (the fitted
part; weights are counted exactly) over the held-out points.

Times are CPU seconds of one training step on one core (process time, OMP_NUM_THREADS=1), only to
say what the measurement costs; they say nothing about a GPU's speed.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runner import ChildFailed, run_child  # noqa: E402

IMAGE_TOKEN_ID = 257152  # PaliGemma 2's <image>
MIN_AVAILABLE_GIB = 14  # other jobs share this machine: wait for this much before a measurement
FIT, ATTENTION_FIT, HELD_OUT = "fit", "fit (backward)", "held out"


def point(size, image_size, text_layers, vision_layers, variants, mode="lora", compute="bf16", freeze_vision=False):
    """One loaded model and the training steps measured on it: (batch, label_only, checkpointing, role)."""
    return {"size": size, "image_size": image_size, "text_layers": text_layers, "vision_layers": vision_layers,
            "mode": mode, "compute": compute, "freeze_vision": freeze_vision,
            "variants": [{"batch": b, "label_only": lo, "checkpointing": gc, "role": role}
                         for b, lo, gc, role in variants]}


# Depth 1 against 2 gives a layer's cost; 224 against 448 px its T and T^2 parts; logits at every
# position against the label positions only separates the logits from the per-token rest. The
# held-out points vary what the fit did not see. Checkpointing stays the last variant of a model.
PLAN = [
    point("3b", 224, 1, 1, [(1, False, False, FIT), (1, True, False, FIT)]),
    point("3b", 224, 2, 1, [(1, True, False, FIT)]),
    point("3b", 224, 1, 2, [(1, True, False, FIT)]),
    point("3b", 448, 1, 1, [(1, True, False, FIT)]),
    point("3b", 448, 2, 1, [(1, True, False, FIT)]),
    point("3b", 672, 1, 1, [(1, True, True, ATTENTION_FIT)]),
    point("3b", 896, 1, 1, [(1, True, True, ATTENTION_FIT)]),
    point("10b", 896, 1, 1, [(1, True, True, ATTENTION_FIT)]),
    point("3b", 224, 1, 1, [(1, True, False, FIT)], mode="full"),
    point("3b", 224, 2, 1, [(1, True, False, FIT)], mode="full"),
    point("3b", 224, 1, 2, [(1, True, False, FIT)], mode="full"),
    point("3b", 224, 1, 1, [(1, False, False, FIT), (1, True, False, FIT)], compute="fp32"),
    point("3b", 224, 2, 1, [(1, True, False, FIT)], compute="fp32"),
    point("3b", 224, 1, 2, [(1, True, False, FIT)], compute="fp32"),
    point("3b", 448, 2, 1, [(1, True, False, FIT)], compute="fp32"),
    point("3b", 672, 1, 1, [(1, True, True, ATTENTION_FIT)], compute="fp32"),
    # held out
    point("3b", 336, 3, 2, [(2, True, False, HELD_OUT), (1, False, False, HELD_OUT)]),
    point("3b", 448, 3, 2, [(1, True, False, HELD_OUT), (1, True, True, HELD_OUT)]),
    point("3b", 896, 2, 1, [(1, True, False, HELD_OUT)]),
    point("10b", 224, 2, 2, [(1, True, False, HELD_OUT)]),
    point("10b", 672, 1, 1, [(1, True, True, HELD_OUT)]),
    point("3b", 224, 2, 2, [(2, True, False, HELD_OUT)], freeze_vision=True),
    point("3b", 224, 1, 1, [(1, True, False, HELD_OUT)], mode="qlora"),
    point("3b", 448, 2, 2, [(1, True, False, HELD_OUT)], mode="qlora"),
    point("3b", 448, 2, 2, [(1, True, False, HELD_OUT), (1, True, True, HELD_OUT)], mode="full"),
    point("3b", 448, 2, 2, [(2, True, False, HELD_OUT)], compute="fp32"),
    point("3b", 896, 1, 1, [(1, True, True, HELD_OUT)], compute="fp32"),
    point("3b", 224, 2, 2, [(1, True, False, HELD_OUT)], mode="qlora", compute="fp32"),
]


# --- One measured model (run in its own subprocess) -------------------------------------------------

def saved_model(size: str, image_size: int, text_layers: int, vision_layers: int, cache_dir: str) -> str:
    """A random-weight PaliGemma 2 at the real widths with few layers, saved in bf16 once per shape."""
    from paligemma_json.architecture import paligemma2_config
    path = os.path.join(cache_dir, f"{size}-{image_size}px-{text_layers}t-{vision_layers}v")
    if not os.path.isdir(path):
        model = random_model(paligemma2_config(size, image_size, text_layers, vision_layers))
        model.save_pretrained(path + ".partial")
        os.rename(path + ".partial", path)
    return path


def random_model(config, device: str = "cpu"):
    """PaliGemma 2 as `config` describes it, in bf16 on `device`, with random weights (seed 0): memory and
    speed do not depend on the values, and transformers' own initialisation takes 2-3x as long on one core."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    from transformers.initialization import no_init_weights
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init_weights():
            model = PaliGemmaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.tie_weights()  # part of the initialisation skipped: the LM head is the embedding
    fill_random(model, seed=0)
    return model


def fill_random(model, seed: int = 0, std: float = 0.02) -> None:
    """Random normal values in every parameter, drawn by a generator on that parameter's own device:
    under `torch.device("cuda")` the model is built on the GPU, and a CPU generator cannot fill it."""
    import torch
    generators = {}
    for parameter in model.parameters():
        device = parameter.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        parameter.data.normal_(0.0, std, generator=generators[device])


def synthetic_batch(config, batch_size: int, dtype, label_only: bool) -> dict:
    """What `collate_fn` gives for `batch_size` images: image tokens, a prompt, then the label with
    its EOS; the label alone is scored. `label_only` adds the label-only loss's keys, as `collate_fn` does."""
    import torch
    from paligemma_json.memory import LABEL_TOKENS, PROMPT_TOKENS
    from paligemma_json.architecture import image_tokens
    from paligemma_json.training import with_label_only, without_label_only
    generator = torch.Generator().manual_seed(0)
    patches = image_tokens(config)
    text = torch.randint(2, IMAGE_TOKEN_ID, (batch_size, PROMPT_TOKENS + LABEL_TOKENS), generator=generator)
    input_ids = torch.cat([torch.full((batch_size, patches), IMAGE_TOKEN_ID), text], dim=1)
    prefix = patches + PROMPT_TOKENS
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, prefix:] = 1  # the suffix: causal attention, and the loss
    labels = input_ids.clone()
    labels[:, :prefix] = -100
    size = config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "token_type_ids": token_type_ids,
              "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(dtype), "labels": labels}
    return with_label_only(inputs) if label_only else without_label_only(inputs)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def static_tensors(model):
    """Parameters, buffers, and bitsandbytes' quantization state (its absmax is not a parameter)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        yield tensor
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            yield state.absmax
            yield state.code


def load(shape: dict):
    """The model as the script loads it, its Trainer, and the model as the Trainer trains it."""
    import torch
    import finetune_paligemma2 as flow
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[shape["compute"]]
    path = saved_model(shape["size"], shape["image_size"], shape["text_layers"], shape["vision_layers"],
                       shape["cache_dir"])
    model = flow.load_model(path, use_lora=shape["mode"] != "full", use_qlora=shape["mode"] == "qlora",
                            freeze_vision=shape["freeze_vision"], lora_rank=flow.LORA_RANK,
                            lora_targets=flow.LORA_TARGET_MODULES, dtype=dtype)
    generation = flow.GenerationSettings(dtype, max_new_tokens=8)
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = flow.training_arguments(output_dir, generation, {**flow.DEFAULTS, "GRAD_ACCUM": 2, "MAX_STEPS": 1})
        trainer = flow.ExtractionTrainer(model=model, args=arguments, eval_dataset=[{}], predict_rows=None)  # never evaluates
    trainer.current_gradient_accumulation_steps = 2
    return model, trainer, trainer.accelerator.prepare_model(model), dtype


def profiled_peak(step) -> tuple[int, int, float]:
    """(the most bytes `step` held above what existed before it, the most before the embedding's
    backward began, CPU seconds). Frees of blocks that existed before are not counted (the profiler
    cannot size them), so the running sum never goes below zero."""
    from torch.profiler import ProfilerActivity, profile
    started = time.process_time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    seconds = time.process_time() - started
    events = profiler.profiler.kineto_results.events()
    embedding_backward = min((event.start_ns() for event in events if "EmbeddingBackward" in event.name()),
                             default=float("inf"))  # a trained (tied) embedding: a full fine-tune
    live = peak = peak_before = 0
    for start, nbytes in sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
        if start < embedding_backward:
            peak_before = max(peak_before, live)
    return peak, peak_before, seconds


def measure(shape: dict) -> list[dict]:
    """One loaded model, one training step per variant."""
    import torch
    from paligemma_json.training import enable_gradient_checkpointing
    model, trainer, wrapped, dtype = load(shape)
    trained = [p for p in model.parameters() if p.requires_grad]
    for parameter in trained:  # a later micro-batch of an accumulated step: the gradients are held already
        parameter.grad = torch.zeros_like(parameter)
    held = {"weights": storage_bytes(static_tensors(model)), "gradients": storage_bytes(p.grad for p in trained),
            "trained_parameters": sum(p.numel() for p in trained)}
    results = []
    for variant in shape["variants"]:
        if variant["checkpointing"]:
            enable_gradient_checkpointing(model)  # what Trainer.train() does with GRADIENT_CHECKPOINTING
        inputs = synthetic_batch(model.config, variant["batch"], dtype, variant["label_only"])
        scored = int((inputs["labels"][:, 1:] != -100).sum())
        peak, before, seconds = profiled_peak(lambda: trainer.training_step(wrapped, inputs, num_items_in_batch=scored))
        fixed = {key: value for key, value in shape.items() if key not in ("variants", "cache_dir")}
        results.append({**fixed, **variant, **held, "step_peak": peak, "peak_before_embedding_backward": before,
                        "cpu_seconds": seconds})
    return results


# --- Running the plan ---------------------------------------------------------------------------------

def available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def wait_for_memory() -> None:
    while available_gib() < MIN_AVAILABLE_GIB:
        print(f"  waiting: {available_gib():.1f} GiB available, {MIN_AVAILABLE_GIB} wanted", flush=True)
        time.sleep(60)


def same_shape_groups(plan: list[dict]) -> list[list[dict]]:
    """The plan's models grouped by their saved shape (size, resolution, depths), in the plan's order:
    one process measures a group, so it starts once and builds the shape once."""
    groups = {}
    for shape in plan:
        groups.setdefault((shape["size"], shape["image_size"], shape["text_layers"], shape["vision_layers"]),
                          []).append(shape)
    return list(groups.values())


def run_group(shapes: list[dict], cache_dir: str) -> list[dict]:
    wait_for_memory()
    request = [{**shape, "cache_dir": cache_dir} for shape in shapes]
    try:
        return run_child(__file__, [json.dumps(request)], f"measurement {shapes}",
                         env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    except ChildFailed as failure:
        sys.exit(str(failure))


def measure_group(shapes: list[dict]) -> list[dict]:
    """Each model of a group in turn, each freed before the next loads (the step's count starts from
    what exists, so an earlier model's leftovers could not inflate it anyway)."""
    import gc
    results = []
    for shape in shapes:
        results += measure(shape)
        gc.collect()
    return results


# --- Fitting -----------------------------------------------------------------------------------------

COEFFICIENT_NAMES = ("rest", "head", "text_linear", "text_quadratic", "vision", "mlp_backward", "attention_backward",
                     "attention_linear", "layer_weights", "embedding", "embedding_end")
LINEAR = ("rest", "head", "text_linear", "text_quadratic", "vision")
BACKWARD = ("mlp_backward", "attention_backward", "attention_linear")
BEFORE_EMBEDDING = "before the embedding's backward"


def setting_of(measurement: dict):
    from paligemma_json.memory import TrainingSetting
    return TrainingSetting(mode=measurement["mode"], compute=measurement["compute"], batch_size=measurement["batch"],
                           gradient_checkpointing=measurement["checkpointing"],
                           freeze_vision=measurement["freeze_vision"], label_only_loss=measurement["label_only"])


def shape_architecture(measurement: dict, cache: dict):
    from paligemma_json.architecture import architecture, paligemma2_config
    key = (measurement["size"], measurement["image_size"], measurement["text_layers"], measurement["vision_layers"])
    if key not in cache:
        cache[key] = architecture(paligemma2_config(*key))
    return cache[key]


def predicted(measurement: dict, coefficients: dict, cache: dict, phase: str = "") -> float:
    """The formula's activation bytes at the step's peak, or at one phase's (`before the embedding's
    backward`: the largest phase but the embedding's)."""
    from paligemma_json.memory import activation_parts
    parts = activation_parts(shape_architecture(measurement, cache), setting_of(measurement), coefficients)
    if phase == BEFORE_EMBEDDING:
        parts.pop("embedding", None)
    return max(parts.values())


def target(measurement: dict, phase: str = "") -> float:
    return measurement["peak_before_embedding_backward" if phase == BEFORE_EMBEDDING else "step_peak"]


def least_squares(rows, targets) -> list[float]:
    import torch
    solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                  torch.tensor(targets, dtype=torch.float64).unsqueeze(1)).solution
    return solution.squeeze(1).tolist()


def fit_names(measurements: list[dict], names, base: dict, cache: dict, phase: str = "", rounds: int = 3) -> dict:
    """Least squares on `names`, the others held at `base`. The formula is linear in each coefficient
    within the phase that sets the peak, so a few rounds from `base` settle which phase that is."""
    coefficients = dict(base)
    for _ in range(rounds):
        at = [predicted(m, coefficients, cache, phase) for m in measurements]
        rows = [[predicted(m, {**coefficients, name: coefficients[name] + 1.0}, cache, phase) - value for name in names]
                for m, value in zip(measurements, at)]
        steps = least_squares(rows, [target(m, phase) - value for m, value in zip(measurements, at)])
        coefficients.update({name: coefficients[name] + step for name, step in zip(names, steps)})
    return coefficients


def fit(measurements: list[dict], cache: dict) -> dict:
    """Every mode's coefficients. LoRA's come from its own points; QLoRA's activations are LoRA's
    (its held-out points check that); a full fine-tune is LoRA plus its weight copies and gradient
    transients; fp32 compute has its own linear terms."""
    def points(mode, compute, role=FIT):
        return [m for m in measurements if (m["mode"], m["compute"], m["role"]) == (mode, compute, role)]
    # Where the search starts, so that each phase is the one that sets its points' peak: about the
    # bytes the backward's transients were seen to hold (profiler traces of a 3B layer at 896 px).
    start = {**dict.fromkeys(COEFFICIENT_NAMES, 0.0), "mlp_backward": 30.0, "attention_backward": 6.0,
             "attention_linear": 25.0, "embedding_end": 8.0}
    lora = fit_names(points("lora", "bf16"), LINEAR, start, cache)
    lora = fit_names(points("lora", "bf16", ATTENTION_FIT), BACKWARD, lora, cache)
    lora = fit_names(points("lora", "bf16"), LINEAR, lora, cache)  # the linear terms again, with the backward's
    full = fit_names(points("full", "bf16"), ("layer_weights", "embedding"), lora, cache, BEFORE_EMBEDDING)
    full = fit_names(points("full", "bf16"), ("embedding_end",), full, cache)
    lora_fp32 = fit_names(points("lora", "fp32"), LINEAR, lora, cache)
    # ASSUMPTION, checked on a held-out 896 px point: the attention's gradients grow from bf16 to fp32 as
    # its saved scores and the per-token activations do. The MLP's are fitted on their own fp32 point.
    lora_fp32["attention_backward"] = lora["attention_backward"] * lora_fp32["text_quadratic"] / lora["text_quadratic"]
    lora_fp32["attention_linear"] = lora["attention_linear"] * lora_fp32["text_linear"] / lora["text_linear"]
    lora_fp32 = fit_names(points("lora", "fp32", ATTENTION_FIT), ("mlp_backward",), lora_fp32, cache)
    # ASSUMPTION (no fp32 full fine-tune is measured: it never fits a T4): bf16's copies and transients,
    # an upper bound, since without autocast there are no bf16 copies.
    full_fp32 = {**lora_fp32, **{name: full[name] for name in ("layer_weights", "embedding", "embedding_end")}}
    lora, lora_fp32 = ({**values, "embedding_end": 0.0} for values in (lora, lora_fp32))  # no trained embedding
    return {("lora", "bf16"): lora, ("qlora", "bf16"): lora, ("full", "bf16"): full,
            ("lora", "fp32"): lora_fp32, ("qlora", "fp32"): lora_fp32, ("full", "fp32"): full_fp32}


# --- Report ------------------------------------------------------------------------------------------

def describe(m: dict) -> str:
    return (f"{m['size']} {m['image_size']}px {m['mode']:5} {m['compute']} L={m['text_layers']}+{m['vision_layers']}v "
            f"b={m['batch']} {'label-only' if m['label_only'] else 'all-logits'}{' ckpt' if m['checkpointing'] else ''}"
            f"{' frozen-vision' if m['freeze_vision'] else ''}")


def comparisons(measurements: list[dict]):
    """(measurement, phase) pairs to compare: every step's peak, and for a full fine-tune also its
    peak before the embedding's backward (at few layers the embedding's sets the step's peak)."""
    for m in measurements:
        yield m, ""
        if m["mode"] == "full":
            yield m, BEFORE_EMBEDDING


def check(measurements: list[dict], coefficients: dict, cache: dict) -> float:
    """Prints measured against predicted for every point; returns the largest held-out relative
    error of the activation bytes."""
    from paligemma_json.memory import estimate, weight_bytes
    print("\nmeasured against predicted (MB = 1e6 bytes; activations: the step's peak above the weights and "
          "held gradients; total: weights + held gradients + that peak; weights: counted against the tensors)")
    print(f"  {'point':80} {'role':15} {'cpu s':>6} {'act meas':>9} {'act pred':>9} {'err':>7} "
          f"{'total err':>9} {'weights err':>11}")
    worst = 0.0
    for m, phase in comparisons(measurements):
        arch, setting = shape_architecture(m, cache), setting_of(m)
        guess, measured = predicted(m, coefficients[(m["mode"], m["compute"])], cache, phase), target(m, phase)
        error = guess / measured - 1
        estimated = estimate(arch, setting, coefficients[(m["mode"], m["compute"])])
        total_error = (estimated.weights + estimated.gradients + guess) / (m["weights"] + m["gradients"] + measured) - 1
        weights_error = weight_bytes(arch, setting) / m["weights"] - 1
        if m["role"] == HELD_OUT:
            worst = max(worst, abs(error))
        label = describe(m) + (f" [{phase}]" if phase else "")
        print(f"  {label:80} {m['role']:15} {m['cpu_seconds']:6.1f} {measured / 1e6:9.1f} {guess / 1e6:9.1f} "
              f"{error:+7.1%} {total_error:+9.1%} {weights_error:+11.2%}")
    return worst


def full_depth_rows(coefficients: dict, measured_kinds: set):
    """Estimates for the full-depth models: (size, px, mode, checkpointing, batch, bf16 GiB, fp32 GiB, basis)."""
    from paligemma_json.architecture import architecture, paligemma2_config
    from paligemma_json.memory import GIB, TrainingSetting, estimate
    for size in ("3b", "10b"):
        for image_size in (224, 448, 896):
            arch = architecture(paligemma2_config(size, image_size))
            for mode in ("lora", "qlora", "full"):
                for checkpointing in (False, True):
                    for batch in (1, 2, 8):
                        setting = TrainingSetting(mode=mode, compute="bf16", batch_size=batch,
                                                  gradient_checkpointing=checkpointing)
                        bf16 = estimate(arch, setting, coefficients[(mode, "bf16")]).total / GIB
                        fp32 = estimate(arch, replace(setting, compute="fp32"),
                                        coefficients[(mode, "fp32")]).total / GIB
                        basis = "fit" if (size, image_size, mode) in measured_kinds else "extrapolated"
                        yield size, image_size, mode, checkpointing, batch, bf16, fp32, basis


def fits(row) -> dict:
    from paligemma_json.cards import memory_sizes
    from paligemma_json.memory import CUDA_CONTEXT_BYTES, GIB
    size, image_size, mode, checkpointing, batch, bf16, fp32, basis = row
    return {card: (fp32 if compute == "fp32" else bf16) + CUDA_CONTEXT_BYTES / GIB <= capacity
            for card, capacity, compute in memory_sizes()}


NOTES = """
notes on the estimates below:
- CPU-derived: torch's CPU allocator at one to three layers, extrapolated per layer; no GPU has checked them.
- What a CPU cannot show, added as stated constants (paligemma_json/memory.py): the CUDA context, 0.5 GiB
  against each card's total (~400 MB with CUDA >= 11.7's lazy loading, pytorch/pytorch#109888), and the
  caching allocator's slack, +10% of everything but the weights (an ASSUMPTION until a GPU measures it).
- A step's peak with GRAD_ACCUM > 1: the earlier micro-batches' fp32 gradients held, AdamW's two fp32 moments.
- QLoRA: nf4 weights counted exactly (4 bits + an fp32 absmax per 64); its activations measured equal to
  LoRA's (held out at 224 and 448 px). bitsandbytes' CUDA 4-bit matmul dequantizes the weight before a plain
  matmul above 1,536 tokens a batch, as the CPU path always does, and uses a fused kernel without that copy
  below; the dequantized copy never set the CPU's peak. So QLoRA rows are as trustworthy as LoRA's for
  memory; the CPU's 4-bit kernels say nothing about a GPU's speed.
- fp32 (a T4) full fine-tune: not measured; bf16's weight copies are kept (an upper bound). It never fits a
  T4: weights, gradients and AdamW state alone are 16 bytes a parameter.
- basis "extrapolated": no few-layer point of that model, resolution and mode was measured here (a 10B full
  fine-tune's few layers alone need more memory than a measurement here may take).
"""


def print_table(rows: list) -> None:
    from paligemma_json.cards import memory_sizes
    print(NOTES)
    print("full-depth estimates (GiB, CPU-derived; label-only loss; 150-token labels; LoRA r=8 on the 7 projections; "
          "AdamW; +10% allocator slack; cards count +0.5 GiB of CUDA context; a T4 trains in fp32)")
    names = [card for card, _, _ in memory_sizes()]
    print(f"  {'model':5} {'px':>4} {'mode':5} {'ckpt':4} {'batch':>5} {'bf16 GiB':>9} {'fp32 GiB':>9}  "
          + " ".join(f"{n:>9}" for n in names) + "  basis")
    for row in rows:
        fit_cards = fits(row)
        size, image_size, mode, checkpointing, batch, bf16, fp32, basis = row
        print(f"  {size:5} {image_size:4} {mode:5} {'yes' if checkpointing else 'no':4} {batch:5} {bf16:9.1f} "
              f"{fp32:9.1f}  " + " ".join(f"{'yes' if fit_cards[n] else '-':>9}" for n in names) + f"  {basis}")


def print_markdown(rows: list) -> None:
    """The table in docs/gpu-memory.md: batch 1 and 2, each cell `bf16 GiB / fp32 GiB: the smallest card that fits`."""
    order = ["T4", "L4", "A100 40GB", "A100 80GB"]  # an H100 80GB holds what an A100 80GB does, less 0.4 GiB
    cells = {}
    for row in rows:
        size, image_size, mode, checkpointing, batch, bf16, fp32, basis = row
        fitting = [card for card in order if fits(row)[card]]
        card = fitting[0].replace("A100 80GB", "80GB") if fitting else "none"
        key = (size, image_size, mode, checkpointing, basis)
        cells.setdefault(key, {})[batch] = f"{bf16:.1f} / {fp32:.1f}: {card}"
    print("\n| Model | px | Mode | Checkpointing | Batch 1 | Batch 2 |")
    print("|---|---|---|---|---|---|")
    for (size, image_size, mode, checkpointing, basis), by_batch in cells.items():
        mark = "" if basis == "fit" else " †"
        print(f"| {size.upper()} | {image_size} | {dict(lora='LoRA', qlora='QLoRA', full='full')[mode]}{mark} | "
              f"{'yes' if checkpointing else 'no'} | {by_batch[1]} | {by_batch[2]} |")


def print_coefficients(coefficients: dict) -> None:
    print("\ncoefficients for paligemma_json/memory.py (bytes):")
    print("COEFFICIENTS = {")
    for key, values in coefficients.items():
        print(f"    {key!r}: {{" + ", ".join(f'"{name}": {values[name]:.4g}' for name in COEFFICIENT_NAMES) + "},")
    print("}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="", help="where the few-layer models are saved (default: a temp dir)")
    parser.add_argument("--keep-models", action="store_true", help="keep the saved models for a later run")
    parser.add_argument("--save", default="", help="also write the measurements to this JSON file")
    parser.add_argument("--refit", default="", help="fit and report from a --save file, measuring nothing")
    parser.add_argument("--markdown", action="store_true", help="also print the table in docs/gpu-memory.md (batch 1 and 2)")
    args = parser.parse_args(argv)
    started = time.time()
    if args.refit:
        with open(args.refit) as saved:
            measurements = json.load(saved)
    else:
        measurements = measure_plan(args.work_dir, args.keep_models)
        if args.save:
            with open(args.save, "w") as saved:
                json.dump(measurements, saved, indent=1)
    cache = {}
    coefficients = fit(measurements, cache)
    worst = check(measurements, coefficients, cache)
    measured_kinds = {(m["size"], m["image_size"], m["mode"]) for m in measurements}
    rows = list(full_depth_rows(coefficients, measured_kinds))
    print_table(rows)
    if args.markdown:
        print_markdown(rows)
    print_coefficients(coefficients)
    import resource
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    print(f"\nwall time {time.time() - started:.0f} s" + ("" if args.refit else
                                                         f", largest measurement process {largest:.1f} GiB of RSS")
          + "; the times above are single-core CPU seconds of one training step (process time), not GPU times")
    print(f"fit_model_error={worst:.4f}")


def measure_plan(work_dir: str, keep_models: bool) -> list[dict]:
    cache_dir = work_dir or tempfile.mkdtemp(prefix="real_width_")
    os.makedirs(cache_dir, exist_ok=True)
    started, measurements, groups = time.time(), [], same_shape_groups(PLAN)
    try:
        for index, group in enumerate(groups, 1):
            for m in run_group(group, cache_dir):
                measurements.append(m)
                print(f"[{index}/{len(groups)}] {describe(m)}: step peak {m['step_peak'] / 1e6:.1f} MB, "
                      f"{m['cpu_seconds']:.1f} CPU s ({time.time() - started:.0f} s so far)", flush=True)
    finally:
        if not keep_models:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return measurements


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure_group(json.loads(sys.argv[2]))))
    else:
        main()
