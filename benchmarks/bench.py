"""Times the tutorial's flow as written against ours, on the demo's tiny PaliGemma 2 and synthetic
data, in one run on one machine, and prints ours-over-tutorial ratios.

    python benchmarks/bench.py --quick        # < 5 min on a 2-core CPU: 480 training samples, not 3,360
    python benchmarks/bench.py                # the demo's 3,360 training samples; 3 repeats either way
    python benchmarks/bench.py --repeats 5 --samples 960 --work-dir /tmp/bench

The last line is always `train_speedup=<x> inference_speedup=<y> train_time_to_loss_speedup=<z>`
(medians of per-repeat ratios: ours' rates over the tutorial's, and for z the tutorial's time over
ours'; z is `not_reached` when ours never got there).

train_time_to_loss_speedup: the training time the tutorial needs to reach its own final loss over the
time ours needs to reach that same loss, in the same run. The loss is `final_training_loss`, measured
at the start and at up to CURVE_POINTS - 1 evenly spaced optimizer steps of each run, clock paused
(`LossCurve`), and once more after the last step; the crossing is interpolated linearly in time
between the two measured points that bracket it (`time_to_loss`). The tutorial's curve ends on its
own final loss by construction, so its time is its whole training time, unless an earlier measured
point is already at or below it (its loss went back up); the report says which.

What "the tutorial as written" means here (Roboflow's guide, shared/tutorial/):
- model: `from_pretrained(MODEL_ID, device_map="auto").to(DEVICE)`, `TORCH_DTYPE = model.dtype`
  (its full fine-tuning branch: LoRA barely moves a random tiny model, so both sides train fully);
- collate: the processor and `.to(TORCH_DTYPE).to(DEVICE)` inside the data loader's collate;
- TrainingArguments: batch 3 x accumulation 16, warmup 2, weight decay 1e-6, bf16, logging every
  200 steps, tensorboard, no pin memory. Substitutions, each forced or neutral: `adamw_hf` was removed from
  transformers 5.x (-> `adamw_torch`); `bf16=True` raises on a machine without a GPU unless
  `use_cpu=True` is added (added, so bf16 autocast runs on the CPU, as written); `num_train_epochs`
  -> `max_steps` so both sides see the same number of samples; learning rate -> the demo's (the
  tutorial's 5e-5 does not move a random tiny model); `include_num_input_tokens_seen="non_padding"`
  added, to count its tokens as ours are counted.
- test inference: one image at a time, beam search with `num_beams=3`. Its `max_new_tokens=256` is
  replaced by ours (the longest train/valid label + 25%) on both sides, so the comparison is about
  the method (batching, greedy, grammar), not about how long each side may run on.

"Ours" is the script's own pieces, imported: `load_processor`, `load_model`, `build_trainer` (with
the demo's overrides, evaluation pushed past the end of the run so neither side evaluates while
timed), `load_trained_model`, `build_constraint` and `predict_rows` (batched greedy, constrained to the
labels' schema, with per-field confidence).

Each measurement runs in a fresh subprocess, so one cannot warm the other's caches or allocator.
Peak memory is the peak resident set size (VmHWM, reset through /proc/self/clear_refs right before the
timed region) minus the resident size at that moment: what the timed region added. Model loading
happens before it on both sides.
"""

import argparse
import ctypes
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is local; never wait for the Hub
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transformers import TrainerCallback  # noqa: E402  (after HF_HUB_OFFLINE)

from runner import answer_if_child, run_child  # noqa: E402

TUTORIAL_BATCH_SIZE, TUTORIAL_GRAD_ACCUM = 3, 16  # its effective batch of 48
TUTORIAL_NUM_BEAMS = 3
REFERENCE_STEPS = 400  # the demo's length when the ratios were measured (now 600): the model inference is timed on
FULL_SAMPLES = 3360  # 70 tutorial steps of 48, 420 of ours of 8: about the demo's 400 steps
QUICK_SAMPLES = 480  # 10 tutorial steps, 60 of ours
# Both sides train on the first 144 of the 150 training rows: 3 of the tutorial's batches of 48, 18
# of ours of 8. With 150, every epoch ends in a short step (the Trainer steps on the remainder), so
# steps x effective batch would overstate the tutorial's samples by a fifth.
TRAIN_ROWS = 144
LOSS_SAMPLES = 48  # the final loss is measured on the first 48 training rows, the same for both sides
CURVE_POINTS = 20  # loss measurements (untimed) along each run, for the time to reach the tutorial's final loss


# --- Memory and timing helpers ----------------------------------------------------------------

def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Resets this process's peak RSS to its current RSS (Linux) and returns that, in KiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_kib("VmRSS")


def peak_rss_delta_mib(baseline_kib: int) -> float:
    return (status_kib("VmHWM") - baseline_kib) / 1024


# --- The tutorial's flow, as written --------------------------------------------------------

def tutorial_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tutorial_load(model_dir: str):
    """Its full fine-tuning branch: no dtype given, `device_map="auto"`, then `.to(DEVICE)`."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    processor = PaliGemmaProcessor.from_pretrained(model_dir)
    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir, device_map="auto").to(tutorial_device())
    return processor, model


def tutorial_collate(batch, processor, dtype, device):
    """Its collate_fn: the processor, then every tensor cast and moved inside the data loader."""
    images, labels = zip(*batch)
    prefixes = ["<image>" + label["prefix"] for label in labels]
    suffixes = [label["suffix"] for label in labels]
    return processor(text=prefixes, images=images, return_tensors="pt", suffix=suffixes,
                     padding="longest").to(dtype).to(device)


def tutorial_arguments(output_dir: str, max_steps: int, learning_rate: float, bf16: bool = True):
    from transformers import TrainingArguments
    import torch
    return TrainingArguments(
        max_steps=max_steps,  # was num_train_epochs=3: same samples seen on both sides
        remove_unused_columns=False,
        per_device_train_batch_size=TUTORIAL_BATCH_SIZE,
        gradient_accumulation_steps=TUTORIAL_GRAD_ACCUM,
        warmup_steps=2,
        learning_rate=learning_rate,  # was 5e-5: the demo's, on both sides
        weight_decay=1e-6,
        adam_beta2=0.999,
        logging_steps=200,
        optim="adamw_torch",  # was "adamw_hf", removed in transformers 5
        save_strategy="steps",
        save_steps=1000,
        save_total_limit=1,
        output_dir=output_dir,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),  # added: bf16=True raises without it on a CPU-only machine
        report_to=["tensorboard"],
        dataloader_pin_memory=False,
        # Added, to count tokens exactly as ours does (attention_mask.sum() per batch). Counting in
        # the collate instead over-counts: accelerate's loader fetches one batch ahead.
        include_num_input_tokens_seen="non_padding",
    )


def tutorial_trainer(model, processor, train_dataset, valid_dataset, output_dir, max_steps, learning_rate,
                     bf16: bool = True):
    from transformers import Trainer
    collate = functools.partial(tutorial_collate, processor=processor, dtype=model.dtype, device=tutorial_device())
    return Trainer(model=model, train_dataset=train_dataset, eval_dataset=valid_dataset, data_collator=collate,
                   args=tutorial_arguments(output_dir, max_steps, learning_rate, bf16))


def tutorial_predict(model, processor, dataset, max_new_tokens: int, num_beams: int = TUTORIAL_NUM_BEAMS) -> list[str]:
    """Its test inference, once per image: beam search, the prompt sliced off, special tokens skipped."""
    import torch
    texts = []
    for index in range(len(dataset)):
        image, label = dataset[index]
        inputs = processor(text="<image>" + label["prefix"], images=image,
                           return_tensors="pt").to(model.dtype).to(tutorial_device())
        prefix_length = inputs["input_ids"].shape[-1]
        with torch.inference_mode():
            generation = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        num_beams=num_beams)
        texts.append(processor.decode(generation[0][prefix_length:], skip_special_tokens=True))
    return texts


# --- Ours: the script's own pieces ------------------------------------------------------------

def our_settings(output_dir: str, max_steps: int, **changes) -> dict:
    import finetune_paligemma2 as flow
    from paligemma_json.demo import DEMO_OVERRIDES
    settings = {**flow.DEFAULTS, **DEMO_OVERRIDES, "OUTPUT_DIR": output_dir, "MAX_STEPS": max_steps, **changes}
    settings["SAVE_STEPS"] = max_steps + 1  # no checkpoint inside the run; one at its end, as on the tutorial's side
    return settings


def our_trainer(model, processor, train_dataset, valid_dataset, settings: dict):
    """The script's Trainer, without evaluation: the tutorial never evaluates, and generation on
    `valid` is not training throughput. (transformers 5.24 also evaluates at the end of any
    step-based run, so pushing SAVE_STEPS past the end is not enough.)"""
    import finetune_paligemma2 as flow
    from transformers.trainer_utils import IntervalStrategy
    dtype = flow.training_dtype()
    generation = flow.GenerationSettings(dtype, max_new_tokens=64, batch_size=settings["EVAL_BATCH_SIZE"])
    arguments = flow.training_arguments(settings["OUTPUT_DIR"], generation, settings)
    trainer = flow.build_trainer(model, processor, train_dataset, valid_dataset, generation, arguments)
    trainer.args.eval_strategy = IntervalStrategy.NO  # set in place: dataclasses.replace resets accelerate's state
    return trainer


def our_load(model_dir: str):
    import finetune_paligemma2 as flow
    dtype = flow.training_dtype()
    processor = flow.load_processor(model_dir)
    model = flow.load_model(model_dir, use_lora=False, use_qlora=False, freeze_vision=False, lora_rank=8,
                            lora_targets=flow.LORA_TARGET_MODULES, dtype=dtype)
    return processor, model


def our_predict(model, processor, dataset, max_new_tokens: int, schema: dict, batch_size: int = 8,
                constrained: bool = True, with_confidence: bool = True, also_free: bool = False) -> list[str]:
    import finetune_paligemma2 as flow
    constraint = flow.build_constraint(schema, processor, constrained)
    generation = flow.GenerationSettings(flow.training_dtype(), max_new_tokens, batch_size=batch_size)
    rows = flow.predict_rows(model, processor, dataset, generation, constraint=constraint,
                             with_confidence=with_confidence, also_free=also_free)
    return [row["prediction"] for row in rows]


# --- Shared pieces ----------------------------------------------------------------------------

def load_demo_splits(dataset_dir: str) -> dict:
    """Both sides read the same rows with the demo's prompt (the tutorial's JSONLDataset reads the
    same files the same way; replacing the `<JSON>` placeholder prefix is ours)."""
    import finetune_paligemma2 as flow
    from paligemma_json.demo import DEMO_OVERRIDES
    return flow.load_splits(dataset_dir, DEMO_OVERRIDES["PROMPT"])


def first_rows(dataset, count: int):
    """The dataset with only its first `count` rows."""
    import copy
    subset = copy.copy(dataset)
    subset.entries = dataset.entries[:count]
    return subset


def final_training_loss(model, processor, dataset, samples: int = LOSS_SAMPLES) -> float:
    """Mean loss per label token of the trained model on the first `samples` training rows, in fp32
    with our collate for both sides: the last logged loss would compare batches of 3 with batches of 8."""
    import torch
    import finetune_paligemma2 as flow
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    with torch.no_grad():
        for first in range(0, min(samples, len(dataset)), 8):
            batch = [dataset[i] for i in range(first, min(first + 8, samples, len(dataset)))]
            inputs = flow.collate_fn(batch, processor, torch.float32).to(model.device)
            tokens = int((inputs["labels"][:, 1:] != -100).sum())  # the positions the shifted loss scores
            total += float(model(**inputs).loss) * tokens
            count += tokens
    model.train(was_training)
    return total / count


# --- Time to reach a loss ----------------------------------------------------------------------

class LossCurve(TrainerCallback):
    """Records (training seconds, loss) at the start and after the given optimizer steps. The clock
    is paused while `measure()` runs, so the times are training alone, comparable with the run's
    training time less `paused_s`. So is the peak RSS: `training_peak_kib` is the highest before any
    measurement; after each, the memory it freed goes back to the system and the peak is reset, so
    its own memory is not counted (without the trim, the tutorial's peak rose by ~5%, measured)."""

    def __init__(self, measure, steps, clock=time.perf_counter):
        self.measure, self.steps, self.clock = measure, set(steps), clock
        self.points, self.paused_s, self.started, self.training_peak_kib = [], 0.0, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.paused_s, self.points = None, 0.0, []
        self.record()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.record()

    def record(self):
        paused_at = self.clock()
        self.started = paused_at if self.started is None else self.started  # the first point is at 0 s
        self.training_peak_kib = max(self.training_peak_kib, status_kib("VmHWM"))
        loss = self.measure()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        reset_peak_rss()
        self.points.append((paused_at - self.started - self.paused_s, loss))
        self.paused_s += self.clock() - paused_at


def curve_steps(max_steps: int, points: int = CURVE_POINTS) -> list[int]:
    """Up to `points - 1` evenly spaced optimizer steps strictly inside the run: its start and its end
    are measured apart (before the first step, and as the final loss)."""
    return sorted({round(k * max_steps / points) for k in range(1, points)} - {0, max_steps})


def time_to_loss(curve, target: float) -> float | None:
    """The training time at which `curve` ((seconds, loss) in time order) first reaches `target`:
    linear in time between the last point above it and the first at or below it; a point exactly on
    it gives its own time. None when no point reaches it."""
    previous = None
    for seconds, loss in curve:
        if loss == target or (loss < target and previous is None):
            return seconds
        if loss < target:
            before_s, before_loss = previous
            return before_s + (before_loss - target) / (before_loss - loss) * (seconds - before_s)
        previous = (seconds, loss)
    return None


def valid_json_count(texts: list[str]) -> int:
    from paligemma_json.json_text import parse_json
    return sum(parse_json(text) is not None for text in texts)


# --- One measurement (run in its own subprocess) -------------------------------------------------

def measure_training(side: str, work: dict, samples: int, output_dir: str, customize=None, curve_points: int = 0,
                     **variant) -> dict:
    """Trains `samples` samples from the demo's random tiny model; `variant`: a lever's change to
    ours (settings such as BATCH_SIZE) or the tutorial's (`bf16`); `customize(trainer, processor,
    splits)`: a lever that changes the built trainer (benchmarks/levers.py); `curve_points`: also
    measure the loss that many times along the run, untimed (`loss_curve`, ending on the final loss)."""
    from transformers import set_seed
    from paligemma_json.demo import DEMO_OVERRIDES
    set_seed(42)
    splits = load_demo_splits(work["dataset_dir"])
    splits["train"] = first_rows(splits["train"], TRAIN_ROWS)
    learning_rate = DEMO_OVERRIDES["LEARNING_RATE"]
    if side == "tutorial":
        processor, model = tutorial_load(work["model_dir"])
        trainer = tutorial_trainer(model, processor, splits["train"], splits["valid"], output_dir,
                                            samples // (TUTORIAL_BATCH_SIZE * TUTORIAL_GRAD_ACCUM), learning_rate,
                                            **variant)
    else:
        processor, model = our_load(work["model_dir"])
        batch = {**DEMO_OVERRIDES, **variant}
        settings = our_settings(output_dir, samples // (batch["BATCH_SIZE"] * batch["GRAD_ACCUM"]), **variant)
        trainer = our_trainer(model, processor, splits["train"], splits["valid"], settings)
    if customize:
        customize(trainer, processor, splits)
    curve = LossCurve(lambda: final_training_loss(trainer.model, processor, splits["train"]),
                      curve_steps(trainer.args.max_steps, curve_points) if curve_points else [])
    if curve_points:
        trainer.add_callback(curve)
    baseline = reset_peak_rss()
    result = trainer.train()
    peak = max(peak_rss_delta_mib(baseline), (curve.training_peak_kib - baseline) / 1024)
    runtime = result.metrics["train_runtime"] - curve.paused_s  # training alone, as without the curve
    tokens = trainer.state.num_input_tokens_seen  # non-padding, image tokens included: the same count on both sides
    seen = result.global_step * trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    final_loss = final_training_loss(trainer.model, processor, splits["train"])
    return {"samples_per_s": seen / runtime, "tokens_per_s": tokens / runtime, "samples": seen,
            "tokens_per_sample": tokens / seen,  # equal on both sides when both saw the same rows
            "steps": result.global_step, "runtime_s": runtime, "trainer_runtime_s": result.metrics["train_runtime"],
            "peak_rss_mib": peak,
            "run_mean_loss": result.metrics["train_loss"], "final_loss": final_loss,
            # Its last point is the final loss at the whole training time, so a run always reaches
            # its own final loss, at its end at the latest.
            "loss_curve": curve.points + [(runtime, final_loss)] if curve_points else [],
            "loss_measurement_s": curve.paused_s}


def measure_inference(side: str, work: dict, **variant) -> dict:
    """Predicts the test set with the reference model (the demo's 400-step training);
    `variant`: a lever's change to ours (batch_size, constrained, with_confidence, also_free) or
    the tutorial's (num_beams)."""
    import finetune_paligemma2 as flow
    splits = load_demo_splits(work["dataset_dir"])
    test = splits["test"]
    if side == "tutorial":
        processor, model = tutorial_load(work["reference_dir"])
        baseline, start = reset_peak_rss(), time.perf_counter()
        texts = tutorial_predict(model, processor, test, work["max_new_tokens"], **variant)
    else:
        processor = flow.load_processor(work["reference_dir"])
        model = flow.load_trained_model(work["reference_dir"], flow.training_dtype())
        baseline, start = reset_peak_rss(), time.perf_counter()  # the grammar's compilation is timed too
        texts = our_predict(model, processor, test, work["max_new_tokens"], work["schema"], **variant)
    seconds = time.perf_counter() - start
    return {"images_per_s": len(test) / seconds, "seconds": seconds, "images": len(test),
            "peak_rss_mib": peak_rss_delta_mib(baseline), "valid_json": valid_json_count(texts)}


def measure_quietly(request: dict) -> dict:
    """In a subprocess: one measurement, which `answer_if_child` prints as the last line of stdout."""
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):  # the flow's own prints stay out of the result line
        if request["kind"] == "train":
            return measure_training(request["side"], request["work"], request["samples"], request["output_dir"],
                                    curve_points=request.get("curve_points", 0), **request.get("variant", {}))
        return measure_inference(request["side"], request["work"], **request.get("variant", {}))


def run_measurement(request: dict, script: str = __file__) -> dict:
    """`request` measured by `script --child` in a fresh process; its result."""
    return run_child(script, [json.dumps(request)], f"measurement {request['kind']}/{request['side']}", timeout=1800)


# --- Setup: the demo assets and the reference model ----------------------------------------------

def prepare(work_dir: str, seed: int = 0, reference_steps: int = REFERENCE_STEPS) -> dict:
    """Builds the demo data and tiny model, the schema and token budget, and trains the reference
    model that both sides' inference is timed on (ours, the demo's settings: it writes valid JSON,
    so generation lengths are realistic). Reused when `work_dir` already has them."""
    from paligemma_json.demo import build_demo
    manifest_path = os.path.join(work_dir, "work.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as manifest:
            work = json.load(manifest)
        if work.get("reference_steps") == reference_steps:
            return work
    dataset_dir, model_dir = build_demo(work_dir, seed)
    import finetune_paligemma2 as flow
    from paligemma_json.dataset_report import label_tokens, token_budget
    from transformers import set_seed
    splits = load_demo_splits(dataset_dir)
    processor, model = our_load(model_dir)
    set_seed(42)
    reference_dir = os.path.join(work_dir, "reference")
    trainer = our_trainer(model, processor, splits["train"], splits["valid"],
                          our_settings(os.path.join(work_dir, "reference-run"), reference_steps, LOGGING_STEPS=1000))
    trainer.train()
    flow.save_final_model(trainer.model, processor, reference_dir)
    lengths = label_tokens(splits, processor.tokenizer)
    work = {"dataset_dir": dataset_dir, "model_dir": model_dir, "reference_dir": reference_dir,
            "reference_steps": reference_steps, "schema": flow.label_schema(splits),
            "max_new_tokens": token_budget(lengths["train"] + lengths["valid"])}
    with open(manifest_path, "w") as manifest:
        json.dump(work, manifest)
    return work


# --- Summaries ---------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def describe(values: list[float], digits: int = 2) -> str:
    s = spread(values)
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Per repeat: each repeat ran both sides back to back, so pairing them cancels slow spells."""
    return [a / b for a, b in zip(ours, theirs)]


def run_benchmark(work: dict, samples: int, repeats: int, scratch: str) -> dict:
    results = {key: [] for key in ("train/tutorial", "train/ours", "infer/tutorial", "infer/ours")}
    for repeat in range(repeats):
        # Alternate which side goes first, so a slow spell on the shared machine hits both.
        sides = ("tutorial", "ours") if repeat % 2 == 0 else ("ours", "tutorial")
        for kind in ("train", "infer"):
            for side in sides:
                request = {"kind": kind, "side": side, "work": work, "samples": samples,
                           "output_dir": os.path.join(scratch, f"{kind}-{side}-{repeat}"),
                           "curve_points": CURVE_POINTS}
                started = time.perf_counter()
                results[f"{kind}/{side}"].append(run_measurement(request))
                print(f"  repeat {repeat + 1}/{repeats} {kind} {side}: {time.perf_counter() - started:.0f} s wall",
                      file=sys.stderr)
                shutil.rmtree(request["output_dir"], ignore_errors=True)
    return results


def print_report(results: dict, samples: int, max_new_tokens: int) -> tuple[float, float, float | None]:
    def column(key, field):
        return [row[field] for row in results[key]]

    def table(kind: str, rows: tuple, without_ratio: tuple = ()):
        for field, label, digits in rows:
            theirs, ours = column(f"{kind}/tutorial", field), column(f"{kind}/ours", field)
            ratio = "" if field in without_ratio else describe(ratios(ours, theirs))
            print(f"{label:24}{describe(theirs, digits):>26}{describe(ours, digits):>26}{ratio:>22}")
    print(f"\ntraining: {samples} samples on each side (tutorial batch 3 x accumulation 16, ours batch 8 x 1), "
          f"same learning rate; median [min-max] over {len(results['train/ours'])} repeats")
    print(f"{'':24}{'tutorial':>26}{'ours':>26}{'ours / tutorial':>22}")
    table("train", (("samples_per_s", "samples/s", 1), ("tokens_per_s", "tokens/s", 0),
                    ("tokens_per_sample", "tokens per sample", 1), ("peak_rss_mib", "peak RSS delta, MiB", 0),
                    ("final_loss", "final loss", 3), ("run_mean_loss", "mean loss over the run", 3)))
    print(f"\ninference: {results['infer/ours'][0]['images']} test images, max_new_tokens={max_new_tokens} on both "
          "sides (tutorial: one by one, beam 3; ours: batches of 8, greedy, constrained, with confidence)")
    table("infer", (("images_per_s", "images/s", 2), ("peak_rss_mib", "peak RSS delta, MiB", 0),
                    ("valid_json", "valid JSON (of test)", 0)), without_ratio=("valid_json",))
    train = statistics.median(ratios(column("train/ours", "samples_per_s"), column("train/tutorial", "samples_per_s")))
    infer = statistics.median(ratios(column("infer/ours", "images_per_s"), column("infer/tutorial", "images_per_s")))
    return train, infer, print_time_to_loss(results["train/tutorial"], results["train/ours"])


def time_to_tutorial_loss(tutorial: dict, ours: dict) -> dict:
    """One repeat: each side's training time to the tutorial's final loss; ours_s is None when ours
    never got there."""
    target = tutorial["final_loss"]
    if list(tutorial["loss_curve"][-1]) != [tutorial["runtime_s"], target]:
        raise ValueError("the tutorial's loss curve must end on its final loss at its whole training time")
    tutorial_s = time_to_loss(tutorial["loss_curve"], target)
    return {"target": target, "tutorial_s": tutorial_s, "tutorial_at_end": tutorial_s == tutorial["runtime_s"],
            "ours_s": time_to_loss(ours["loss_curve"], target), "ours_run_s": ours["runtime_s"]}


def print_time_to_loss(tutorial_runs: list[dict], our_runs: list[dict]) -> float | None:
    """Prints the time-to-loss block; the median of tutorial time over ours, or None (said why)
    when ours did not reach the tutorial's final loss in every repeat."""
    repeats = [time_to_tutorial_loss(tutorial, ours) for tutorial, ours in zip(tutorial_runs, our_runs)]
    count, at_end = len(repeats), sum(repeat["tutorial_at_end"] for repeat in repeats)
    print(f"\ntime to the tutorial's final loss ({describe([r['target'] for r in repeats], 3)}), training time alone: "
          f"the loss measured untimed at the start, at up to {CURVE_POINTS - 1} steps along and at the end of each run, "
          "linear in time between the two points that bracket it")
    print(f"{'tutorial, s':24}{describe([r['tutorial_s'] for r in repeats]):>26}  its whole run (the target is its "
          f"own final loss) in {at_end} of {count} repeats"
          + ("; in the others an earlier point was already at or below it" if at_end < count else ""))
    missed = [repeat for repeat in repeats if repeat["ours_s"] is None]
    if missed:
        bound = max(repeat["tutorial_s"] / repeat["ours_run_s"] for repeat in missed)
        print(f"ours never reached it in {len(missed)} of {count} repeats (it would need more than its whole run: "
              f"a ratio below {bound:.2f} there); train_time_to_loss_speedup=not_reached")
        return None
    speedups = [repeat["tutorial_s"] / repeat["ours_s"] for repeat in repeats]
    print(f"{'ours, s':24}{describe([r['ours_s'] for r in repeats]):>26}  reached in {count} of {count} repeats")
    print(f"{'tutorial / ours':24}{describe(speedups):>26}  (train_time_to_loss_speedup)")
    return statistics.median(speedups)


def speedup_line(train: float, infer: float, time_to_loss_speedup: float | None) -> str:
    to_loss = "not_reached" if time_to_loss_speedup is None else f"{time_to_loss_speedup:.2f}"
    return f"train_speedup={train:.2f} inference_speedup={infer:.2f} train_time_to_loss_speedup={to_loss}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES} training samples: under 5 min")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per side")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"training samples per side, a multiple of 48 (default {FULL_SAMPLES}, quick {QUICK_SAMPLES})")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS,
                        help="training steps of the model inference is timed on")
    parser.add_argument("--work-dir", default="", help="keep the demo assets and reference model here, and reuse them")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    if answer_if_child(args := parser.parse_args(argv), measure_quietly):
        return
    samples = args.samples or (QUICK_SAMPLES if args.quick else FULL_SAMPLES)
    if samples % 48:
        parser.error("--samples must be a multiple of 48 (the tutorial's effective batch) and of 8 (ours)")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench-")
    started = time.perf_counter()
    try:
        work = prepare(work_dir, reference_steps=args.reference_steps)
        print(f"setup: demo data, tiny model, reference model ({args.reference_steps} steps) in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        results = run_benchmark(work, samples, args.repeats, os.path.join(work_dir, "runs"))
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    import torch
    import transformers
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; {time.perf_counter() - started:.0f} s in all")
    print(speedup_line(*print_report(results, samples, work["max_new_tokens"])))


if __name__ == "__main__":
    main()
