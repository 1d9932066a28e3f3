"""The script itself checked as a user runs it (`python finetune_paligemma2.py ...`), for gpu_check.py.

Each part is a short run of the script in its own process, capped in time, in the order of what a lent
GPU has never shown (shared/GPU-RUNS.md, "Not run on a GPU yet"):

  demo             `--demo`, fewer steps: exit 0, final/, predictions.jsonl, a sane metrics.json
  real-width-lora  the 3B's real widths (full depth on a GPU, 1 text + 1 vision layer on --smoke) with the
                   demo's tokenizer (~1,926 tokens, so the model is built and saved in seconds), 448 px on a
                   GPU (224 on --smoke), LoRA, through `--dataset-dir`/`--model-id` on a few of the demo's rows
  qlora, checkpointing, freeze-vision
                   the same run with `--use-qlora` (skipped, saying why, where bitsandbytes does not import),
                   `--gradient-checkpointing`, `--freeze-vision` (and its adapter must hold no vision weights)
  predict          `--predict` on a folder of the demo's images with real-width-lora's final/
  merge            `--merge` of that run, then the merged model's label log-probabilities against the
                   adapter's (final/) in fp32, and against the base without its adapter, which is what a
                   merge that dropped the adapter would give (MERGE_TOLERANCE says how the bound was set)
  resume           the demo's tiny model under LoRA: a run SIGKILLed once a checkpoint is complete, then
                   `--resume`; its losses and predictions against an uninterrupted run's, within what two
                   uninterrupted runs differ by (0 on a CPU; CUDA is not bit-deterministic)

The models are built in child processes of this file (`--build-model`, `--compare-merge`), so the process
that runs the check never holds GPU memory that the measured runs would then lack.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "finetune_paligemma2.py")
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The real-width runs use a few of the demo's rows: enough to train a few steps and to decode every
# split once (the validation split twice: evaluation, then the confidence threshold).
SMALL_SPLITS = {"train": 8, "valid": 2, "test": 2}
# A high learning rate on purpose: after a few steps at the script's 2e-5 the adapter moves the outputs
# too little for the merge check to tell a correct merge from one that dropped the adapter.
ADAPTER_LEARNING_RATE = "1e-3"
# Bound on |label log-prob, merged - adapter| (nats), fp32 on both sides. Measured on a CPU (docs/gpu-check.md):
# 5.7e-6 at 1+1, 4+4 and 12+4 layers (fp32 rounding of log-probs near -20), while dropping the adapter
# moved them by 0.56, 1.5 and 3.5. The bound leaves room for a GPU's 26 layers of other rounding; the check also
# demands the adapter's effect be 10x the bound, else a merge that dropped it would pass too.
MERGE_TOLERANCE = 1e-3
# The smallest tolerance for the resumed run's losses: fp32 rounding of a loss near 1-10, with margin.
RESUME_LOSS_FLOOR = 1e-5
TAIL_LINES = 60  # of a run's output kept in the returned log: the end says what went wrong


class Skipped(Exception):
    """A part that cannot run here, with the reason (bitsandbytes missing, an earlier part failed)."""


@dataclass
class Context:
    smoke: bool
    work_dir: str
    log_path: str  # each script run's output tail is appended here
    deadline: float = 0.0  # the current part's cap, as time.time()
    made: dict = field(default_factory=dict)  # what earlier parts left for later ones: paths
    logs_dir: str = ""  # each run's whole output (default: the work dir's logs/); --goals: $OUT/logs, returned
    environment: dict = field(default_factory=dict)  # more for every run (--goals: TORCH_LOGS)

    def seconds_left(self) -> float:
        return max(1.0, self.deadline - time.time())

    def needs(self, key: str, part: str) -> str:
        if key not in self.made:
            raise Skipped(f"needs the {part} part, which did not succeed")
        return self.made[key]


# --- Running the script ----------------------------------------------------------------------------

class GpuMemoryPeak:
    """The most GPU memory nvidia-smi saw in use while a run lasted (CUDA context included), or None."""

    def __init__(self):
        self.peak, self.stop = None, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self):
        while not self.stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak = max([self.peak or 0] + [int(value) for value in used[:1]])
            except (OSError, ValueError, subprocess.SubprocessError):
                return  # no nvidia-smi (a CPU): no figure
            self.stop.wait(0.5)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def child_environment(extra: dict | None = None) -> dict:
    # Unbuffered, so a run cut off at its cap still shows how far it got.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(extra or {})}


def run_logged(command: list[str], context: Context, label: str, timeout: float | None = None) -> dict:
    """Runs `command` in its own process group, killed whole at the part's cap; its output goes to a file
    in the work dir and its tail to the returned log. Returns rc, stdout text, wall seconds, GPU peak."""
    output_path = os.path.join(context.logs_dir or os.path.join(context.work_dir, "logs"),
                               re.sub(r"[^\w.-]+", "_", label) + ".log")
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    started = time.time()
    with open(output_path, "w") as output, GpuMemoryPeak() as memory:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env=child_environment(context.environment), start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout or context.seconds_left())
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = "timeout"
    text = open(output_path, errors="replace").read()
    append_tail(context.log_path, label, command, returncode, text)
    result = {"rc": returncode, "stdout": text, "seconds": time.time() - started, "gpu_peak_mib": memory.peak}
    if returncode == "timeout":
        raise RuntimeError(f"{label}: cut off at the part's cap after {result['seconds']:.0f} s; last line: "
                           f"{last_line(text)}")
    return result


def append_tail(log_path: str, label: str, command: list[str], returncode, text: str) -> None:
    lines = text.splitlines()
    with open(log_path, "a") as log:
        log.write(f"\n===== {label}: rc {returncode}: {' '.join(command)}\n")
        if len(lines) > TAIL_LINES:
            log.write(f"[... {len(lines) - TAIL_LINES} lines; the whole output: {label} in the work dir]\n")
        log.write("\n".join(lines[-TAIL_LINES:]) + "\n")


def last_line(text: str) -> str:
    """The line that says what went wrong: the last error line, else the last line (a progress bar's
    carriage returns split into lines)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception)(:|$)|^error", line)]
    return (errors or lines or ["(nothing printed)"])[-1][:300]


def run_script(arguments: list[str], context: Context, label: str, timeout: float | None = None) -> dict:
    return run_logged([sys.executable, SCRIPT, *arguments], context, label, timeout)


def run_child(job: str, arguments: list[str], context: Context, label: str) -> dict:
    """One of this file's own jobs in a child process; its last line is its JSON result."""
    result = run_logged([sys.executable, os.path.abspath(__file__), job, *arguments], context, label)
    if result["rc"] != 0:
        raise RuntimeError(f"{label} exited {result['rc']}: {last_line(result['stdout'])}")
    return json.loads(result["stdout"].strip().splitlines()[-1])


def succeeded(result: dict, label: str) -> None:
    if result["rc"] != 0:
        raise RuntimeError(f"{label} exited {result['rc']}: {last_line(result['stdout'])}")
    if "Traceback" in result["stdout"]:
        raise RuntimeError(f"{label} exited 0 but printed a traceback")


# --- What a finished run must hold -----------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    with open(path) as rows:
        return [json.loads(line) for line in rows if line.strip()]


def finished_run(output_dir: str, test_rows: int) -> dict:
    """The files a finished training run writes, checked; its key figures."""
    for name in ("final", "predictions.jsonl", "metrics.json"):
        if not os.path.exists(os.path.join(output_dir, name)):
            raise RuntimeError(f"{output_dir}: no {name}")
    predictions = read_jsonl(os.path.join(output_dir, "predictions.jsonl"))
    if len(predictions) != test_rows:
        raise RuntimeError(f"predictions.jsonl has {len(predictions)} rows, the test split {test_rows}")
    with open(os.path.join(output_dir, "metrics.json")) as saved:
        metrics = json.load(saved)
    for name in ("json_valid_rate", "field_f1"):
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise RuntimeError(f"metrics.json: {name} is {value!r}, not a rate")
    return {"json_valid_rate": metrics["json_valid_rate"], "field_f1": round(metrics["field_f1"], 4)}


def printed_figures(stdout: str) -> dict:
    """The lines a user reads for speed and memory: the training report, MFU, the fit check's estimate."""
    wanted = ("training:", "MFU", "estimated peak", "memory:")
    lines = [line.strip() for line in stdout.splitlines() if line.strip().startswith(wanted)]
    return {"printed": lines[:4]} if lines else {}


def training_run(context: Context, name: str, arguments: list[str], test_rows: int) -> dict:
    output_dir = os.path.join(context.work_dir, "runs", name)
    shutil.rmtree(output_dir, ignore_errors=True)
    result = run_script([*arguments, "--output-dir", output_dir], context, name)
    succeeded(result, name)
    figures = {"wall_s": round(result["seconds"], 1), **finished_run(output_dir, test_rows),
               **printed_figures(result["stdout"])}
    if result["gpu_peak_mib"] is not None:
        figures["nvidia_smi_peak_mib"] = result["gpu_peak_mib"]
    return {"output_dir": output_dir, **figures}


# --- Parts -----------------------------------------------------------------------------------------

def demo(context: Context) -> dict:
    # 20 steps on a CPU: enough to reach every step of the flow. On a GPU, 100 (a sixth of the demo).
    steps, tokens = ("20", ["--max-new-tokens", "16"]) if context.smoke else ("100", [])
    run = training_run(context, "demo", ["--demo", "--max-steps", steps, "--report-to", "none", *tokens],
                       test_rows=24)
    context.made["demo_dir"] = run.pop("output_dir")
    return run


def small_dataset(context: Context, sizes: dict | None = None, folder: str = "small-export") -> str:
    """A few rows of the demo's export per split (the demo part's, else built here); `sizes`: how many (None:
    all of the split)."""
    from paligemma_json.demo import build_demo, demo_paths
    source, model_dir = demo_paths(context.made.get("demo_dir", os.path.join(context.work_dir, "assets")))
    if not (os.path.isdir(source) and os.path.isdir(model_dir)):
        source, model_dir = build_demo(os.path.join(context.work_dir, "assets"))
    target = os.path.join(context.work_dir, folder)
    shutil.rmtree(target, ignore_errors=True)
    for split, count in (sizes or SMALL_SPLITS).items():
        os.makedirs(os.path.join(target, split))
        with open(os.path.join(source, split, "annotations.jsonl")) as annotations:
            rows = annotations.readlines()[:count]
        with open(os.path.join(target, split, "annotations.jsonl"), "w") as kept:
            kept.writelines(rows)
        for row in rows:
            image = json.loads(row)["image"]
            shutil.copy(os.path.join(source, split, image), os.path.join(target, split, image))
    context.made["demo_model"], context.made["demo_export"] = model_dir, source
    return target


def real_width_shape(smoke: bool) -> dict:
    # On a CPU, one layer of each at 224 px keeps a run to seconds; a GPU gets the real thing.
    return {"image_size": 224, "text_layers": 1, "vision_layers": 1} if smoke else \
        {"image_size": 448, "text_layers": None, "vision_layers": None}


def real_width_arguments(context: Context, *extra: str) -> list[str]:
    """The real-width runs' flags; `extra` last, so it overrides (argparse keeps a flag's last value)."""
    steps, batch, tokens = ("2", "1", "8") if context.smoke else ("4", "2", "24")
    return ["--dataset-dir", context.made["small_export"], "--model-id", context.made["real_width_model"],
            "--max-steps", steps, "--save-steps", steps, "--batch-size", batch, "--grad-accum", "1",
            "--learning-rate", ADAPTER_LEARNING_RATE, "--warmup-steps", "0", "--logging-steps", "1",
            "--max-new-tokens", tokens, "--eval-batch-size", "2", "--report-to", "none", "--seed", "0", *extra]


def with_small_dataset(context: Context) -> None:
    if "small_export" not in context.made:
        context.made["small_export"] = small_dataset(context)


def real_width_lora(context: Context) -> dict:
    with_small_dataset(context)
    shape = real_width_shape(context.smoke)
    model_dir = os.path.join(context.work_dir, "real-width-model")
    built = run_child("--build-model", [context.made["demo_model"], model_dir, json.dumps(shape)], context,
                      "build real-width model")
    context.made["real_width_model"] = model_dir
    run = training_run(context, "real-width-lora", real_width_arguments(context), SMALL_SPLITS["test"])
    context.made["lora_dir"] = run.pop("output_dir")
    speed = re.search(r"the steps alone: ([\d.]+) samples/s", " ".join(run.get("printed", [])))
    if speed:  # the decoding part projects a default run's training time from it
        context.made["train_samples_per_s"] = float(speed.group(1))
    return {**built, **run}


def variant_run(context: Context, name: str, *flags: str) -> dict:
    context.needs("real_width_model", "real-width-lora")
    run = training_run(context, name, real_width_arguments(context, *flags), SMALL_SPLITS["test"])
    return run


def import_failure(module: str) -> str:
    """Why `module` does not import, or "" when it does; asked in a child process, since importing
    bitsandbytes can open a CUDA context, whose memory this process would then hold all along."""
    asked = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120,
                           env=child_environment())
    return "" if asked.returncode == 0 else last_line(asked.stderr)


def qlora(context: Context) -> dict:
    failure = import_failure("bitsandbytes")
    if failure:  # not installed, or no library for this CUDA
        raise Skipped(f"bitsandbytes does not import: {failure}")
    run = variant_run(context, "qlora", "--use-qlora")
    run.pop("output_dir")
    return run


def checkpointing(context: Context) -> dict:
    run = variant_run(context, "checkpointing", "--gradient-checkpointing")
    run.pop("output_dir")
    return run


def adapter_tensor_names(final_dir: str) -> list[str]:
    from safetensors import safe_open
    with safe_open(os.path.join(final_dir, "adapter_model.safetensors"), "pt") as adapter:
        return list(adapter.keys())


def freeze_vision(context: Context) -> dict:
    run = variant_run(context, "freeze-vision", "--freeze-vision")
    names = adapter_tensor_names(os.path.join(run.pop("output_dir"), "final"))
    vision = [name for name in names if "vision_tower" in name or "multi_modal_projector" in name]
    if vision:
        raise RuntimeError(f"--freeze-vision saved {len(vision)} vision adapter tensors, e.g. {vision[0]}")
    return {**run, "adapter_tensors": len(names), "vision_adapter_tensors": 0}


def test_images(context: Context, export: str, folder: str, count: int | None = None) -> str:
    """A fresh folder of the first `count` (all: None) test images of an export made earlier, for --predict."""
    images = os.path.join(context.work_dir, folder)
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    test = os.path.join(context.made[export], "test")
    for name in sorted(name for name in os.listdir(test) if name.endswith(".jpg"))[:count]:
        shutil.copy(os.path.join(test, name), images)
    return images


def predict(context: Context) -> dict:
    lora_dir = context.needs("lora_dir", "real-width-lora")
    images = test_images(context, "small_export", "predict-images")
    tokens = "8" if context.smoke else "24"
    result = run_script(["--output-dir", lora_dir, "--predict", images, "--max-new-tokens", tokens,
                         "--eval-batch-size", "2"], context, "predict")
    succeeded(result, "predict")
    rows = read_jsonl(os.path.join(lora_dir, "predict.jsonl"))
    expected = len(os.listdir(images))
    if len(rows) != expected:
        raise RuntimeError(f"predict.jsonl has {len(rows)} rows for {expected} images")
    return {"wall_s": round(result["seconds"], 1), "images": expected,
            "parsed": sum(bool(row.get("parsed")) for row in rows)}


def decoding_records(output_dir: str, since: int = 0) -> list[dict]:
    """The lines the script appended to `output_dir`/decoding.jsonl after the first `since`: which path
    decoded each split and pass, and what it cost. Never a regex over the printed output: a line such as
    "decoding: constrained to the labels' schema" is printed before any decoding, on every path."""
    from paligemma_json.decoding import read_records
    return read_records(output_dir)[since:]


RECORD_FIGURES = ("path", "split_wall_s", "seconds", "compile_s", "ms_per_step", "graphs_compiled", "recompilations",
                  "cudagraph_skips", "reason")


def record_figures(record: dict) -> dict:
    return {key: record.get(key) for key in RECORD_FIGURES}


def decoding(context: Context) -> dict:
    """The decoding issue's test-set decoding: `--predict` on the demo's 24 test pages with the real-width
    run's adapter at the labels' budget (218 tokens), the fast path first, then today's (`--no-fast-decoding`).
    Each run's figures come from the line it appended to decoding.jsonl, which names the path that produced
    them: `speedup` only where the fast run's path is the compiled step (`fast_path` says otherwise)."""
    lora_dir = context.needs("lora_dir", "real-width-lora")
    images = test_images(context, "demo_export", "decoding-images", 4 if context.smoke else None)
    figures = {"images": len(os.listdir(images))}
    for label, flags in (("fast", []), ("today", ["--no-fast-decoding"])):
        since = len(decoding_records(lora_dir))
        result = run_script(["--output-dir", lora_dir, "--predict", images, "--max-new-tokens",
                             "8" if context.smoke else "218", "--eval-batch-size", "8", *flags], context,
                            f"decoding-{label}")
        succeeded(result, f"decoding-{label}")
        records = [record for record in decoding_records(lora_dir, since) if record["split"] == "predict"]
        if len(records) != 1:
            raise RuntimeError(f"decoding-{label}: {len(records)} lines in decoding.jsonl for its --predict, not 1")
        figures.update({f"{label}_{key}": value for key, value in record_figures(records[0]).items()})
        figures[f"{label}_s"] = records[0]["split_wall_s"]
    if figures["fast_path"] == "compiled step" and figures["today_path"].startswith("dynamic cache"):
        figures["speedup"] = round(figures["today_s"] / figures["fast_s"], 2)
        figures["steady_speedup"] = round(figures["today_ms_per_step"] / figures["fast_ms_per_step"], 2)
    if "train_samples_per_s" in context.made:
        figures.update(default_run_projection(context.made["train_samples_per_s"], figures))
    return figures


DEFAULT_RUN = {"epochs": 20, "train": 150, "valid": 16, "test": 24}  # the demo's split sizes, at the defaults


def default_run_projection(train_samples_per_s: float, figures: dict) -> dict:
    """A default real run (20 epochs of 150 pages, evaluated every epoch) from the measured rates: its
    training steps, and the pages it decodes (validation at each evaluation, the threshold's pass over
    validation, the test set constrained and free) at each path's seconds per page, compilation included
    (paid once a run: counted once)."""
    run = DEFAULT_RUN
    pages = run["epochs"] * run["valid"] + run["valid"] + 2 * run["test"]
    projection = {"default_run_training_s": round(run["epochs"] * run["train"] / train_samples_per_s),
                  "default_run_pages_decoded": pages}
    for label in ("today", "fast"):  # the compilation once, the rest per page
        compile_s = figures.get(f"{label}_compile_s") or 0
        per_page = (figures[f"{label}_s"] - compile_s) / figures["images"]
        projection[f"default_run_decoding_{label}_s"] = round(pages * per_page + compile_s)
    return projection


def merge(context: Context) -> dict:
    lora_dir = context.needs("lora_dir", "real-width-lora")
    result = run_script(["--output-dir", lora_dir, "--merge"], context, "merge")
    succeeded(result, "merge")
    merged = os.path.join(lora_dir, "merged")
    if not os.path.isfile(os.path.join(merged, "config.json")):
        raise RuntimeError(f"--merge exited 0 but wrote no {merged}/config.json")
    compared = run_child("--compare-merge", [lora_dir, os.path.join(context.made["small_export"], "test")],
                         context, "compare merged with adapter")
    figures = {"merge_wall_s": round(result["seconds"], 1), **compared, "tolerance": MERGE_TOLERANCE}
    if compared["merged_vs_adapter"] > MERGE_TOLERANCE:
        raise RuntimeError(f"merged model's label log-probs differ from the adapter's by "
                           f"{compared['merged_vs_adapter']:.3g} > {MERGE_TOLERANCE}: {figures}")
    if compared["base_vs_adapter"] < 10 * MERGE_TOLERANCE:
        raise RuntimeError(f"the adapter moves the log-probs by only {compared['base_vs_adapter']:.3g}: too little "
                           f"to tell a merge from none ({figures})")
    return figures


def resume_arguments(context: Context, output_dir: str) -> list[str]:
    """A short LoRA run of the demo's tiny model, checkpointed every 4 of 12 steps."""
    return ["--dataset-dir", context.made["small_export"], "--model-id", context.made["demo_model"],
            "--output-dir", output_dir, "--learning-rate", "1e-2", "--batch-size", "2", "--grad-accum", "1",
            "--warmup-steps", "0", "--max-steps", "12", "--save-steps", "4", "--logging-steps", "1",
            "--max-new-tokens", "24", "--eval-batch-size", "2", "--report-to", "none", "--seed", "3"]


def losses(output_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(output_dir, "checkpoint-12", "trainer_state.json")) as saved:
        state = json.load(saved)
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


def predictions(output_dir: str) -> list[str]:
    return [row["prediction"] for row in read_jsonl(os.path.join(output_dir, "predictions.jsonl"))]


def kill_after_checkpoint(arguments: list[str], checkpoint: str, context: Context) -> None:
    """Starts the script and SIGKILLs it once `checkpoint` is complete (the Trainer writes trainer_state.json
    last), as a preempted machine would."""
    log_path = os.path.join(context.work_dir, "logs", "resume-killed.log")
    command = [sys.executable, SCRIPT, *arguments]
    with open(log_path, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=child_environment(),
                                   start_new_session=True)
        try:
            while not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
                if process.poll() is not None:
                    raise RuntimeError(f"the run ended (rc {process.returncode}) before {checkpoint} was complete: "
                                       f"{last_line(open(log_path, errors='replace').read())}")
                if time.time() > context.deadline:
                    raise RuntimeError(f"no {checkpoint} before the part's cap")
                time.sleep(0.02)
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with open(log_path, errors="replace") as printed:
        append_tail(context.log_path, "resume: killed", command, process.returncode, printed.read())
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the run was not killed mid-run (rc {process.returncode})")


def largest_difference(first: list[tuple[int, float]], second: list[tuple[int, float]]) -> float:
    if [step for step, _ in first] != [step for step, _ in second]:
        raise RuntimeError(f"logged steps differ: {[s for s, _ in first]} against {[s for s, _ in second]}")
    return max(abs(a - b) for (_, a), (_, b) in zip(first, second))


def differing(first: list[str], second: list[str]) -> int:
    return sum(a != b for a, b in zip(first, second)) + abs(len(first) - len(second))


def resume(context: Context) -> dict:
    with_small_dataset(context)
    runs = os.path.join(context.work_dir, "runs")
    straight, again, cut = (os.path.join(runs, name) for name in ("resume-straight", "resume-again", "resume-cut"))
    for path in (straight, again, cut):
        shutil.rmtree(path, ignore_errors=True)
    for path, label in ((straight, "resume: uninterrupted"), (again, "resume: uninterrupted again")):
        succeeded(run_script(resume_arguments(context, path), context, label), label)
    kill_after_checkpoint(resume_arguments(context, cut), os.path.join(cut, "checkpoint-4"), context)
    if os.path.exists(os.path.join(cut, "final")):
        raise RuntimeError("the killed run had already written final/")
    resumed = run_script([*resume_arguments(context, cut), "--resume"], context, "resume: --resume")
    succeeded(resumed, "resume: --resume")
    if "resume: training from" not in resumed["stdout"]:
        raise RuntimeError("--resume did not say it went on from a checkpoint")
    spread = largest_difference(losses(straight), losses(again))
    tolerance = max(2 * spread, RESUME_LOSS_FLOOR)
    error = largest_difference(losses(straight), losses(cut))
    allowed = differing(predictions(straight), predictions(again))
    wrong = differing(predictions(straight), predictions(cut))
    figures = {"loss_steps": len(losses(cut)), "uninterrupted_spread": spread, "resumed_vs_uninterrupted": error,
               "tolerance": tolerance, "predictions_differing": wrong, "allowed_differing": allowed}
    if error > tolerance or wrong > allowed:
        raise RuntimeError(f"the resumed run differs from the uninterrupted one: {figures}")
    return figures


# --- The goals (--goals): what the decoding issue's goals table needs, nothing else -----------------------

GOALS_SPLITS = {"train": 8, "valid": 2, "test": None}  # the test step on the demo's 24 test pages
GOALS_TOKENS = 218  # the labels' budget (the demo's labels, at the script's sizing)


def goals_run(context: Context) -> dict:
    """The real-width run as a user runs it (448 px, full depth, LoRA, 4 steps), its test split the demo's
    24 pages at 218 new tokens: its training and MFU lines, and every decoding it did, from its own
    decoding.jsonl (validation, the threshold's pass, the test step's constrained and free passes)."""
    context.made["small_export"] = small_dataset(context, GOALS_SPLITS if not context.smoke else
                                                 {"train": 8, "valid": 2, "test": 4}, "goals-export")
    if "real_width_model" not in context.made:
        model_dir = os.path.join(context.work_dir, "real-width-model")
        run_child("--build-model", [context.made["demo_model"], model_dir, json.dumps(real_width_shape(context.smoke))],
                  context, "build real-width model")
        context.made["real_width_model"] = model_dir
    tokens = "8" if context.smoke else str(GOALS_TOKENS)
    test_rows = 4 if context.smoke else 24
    run = training_run(context, "goals-run", real_width_arguments(context, "--max-new-tokens", tokens,
                                                                  "--eval-batch-size", "8"), test_rows)
    context.made["lora_dir"] = output_dir = run.pop("output_dir")
    speed = re.search(r"the steps alone: ([\d.]+) samples/s", " ".join(run.get("printed", [])))
    if speed:
        context.made["train_samples_per_s"] = float(speed.group(1))
    records = decoding_records(output_dir)
    figures = {**run, "decodings": [{"split": r["split"], "pass": r["pass"], "images": r["images"], **record_figures(r)}
                                    for r in records]}
    test = [r for r in records if r["split"] == "test"]
    if test:  # the test step: its passes share one split's wall time; the run's compilation, wherever it fell
        figures.update(test_step_s=test[0]["split_wall_s"], test_paths=sorted({r["path"] for r in test}),
                       run_compile_s=round(sum(r["compile_s"] for r in records), 1),
                       test_compile_s=round(sum(r["compile_s"] for r in test), 1))
    return figures


def bf16_agreement(context: Context) -> dict:
    """The demo's trained model decodes its test pages on both paths in bf16, free and constrained (a child
    process: `--bf16-agreement`). The demo run comes from `.whl/demo-run` (made here by `gpu_check.py
    --prepare-demo`, carried with the wheels), else the demo part's, else (--smoke) a short demo trained now."""
    demo_dir = next((path for path in (CARRIED_DEMO, context.made.get("demo_dir")) if path and
                     os.path.isdir(os.path.join(path, "final"))), None)
    if demo_dir is None:
        if not context.smoke:
            raise Skipped(f"no trained demo: run `python benchmarks/gpu_check.py --prepare-demo` here first "
                          f"({CARRIED_DEMO} travels with the wheels)")
        demo_dir = training_run(context, "demo", ["--demo", "--max-steps", "20", "--report-to", "none",
                                                  "--max-new-tokens", "16"], test_rows=24)["output_dir"]
    return run_child("--bf16-agreement", [demo_dir, "8" if context.smoke else "0"], context, "bf16 agreement")


CARRIED_DEMO = os.path.join(ROOT, ".whl", "demo-run")


def compare_paths_in_bf16(demo_dir: str, max_new_tokens: int = 0, compiled: bool = True) -> dict:
    """Today's path against the compiled step, both in bf16, on the demo run's test pages, free and
    constrained: identical rows, the first differing token of each row that differs, and whether every
    constrained row fits the saved schema. On a GPU the compiled step uses CUDA graphs; on the CPU,
    inductor's CPU code (what the tests can check). `max_new_tokens` 0: the run's own budget. `compiled`
    False: the static cache alone, uncompiled (what of a difference the cache's longer, masked sums make)."""
    import torch
    from jsonschema import Draft202012Validator

    import finetune_paligemma2 as flow
    from paligemma_json.decoding import FastDecoding
    from paligemma_json.json_text import parse_json
    from paligemma_json.metrics import compute_metrics
    final_dir = os.path.join(demo_dir, "final")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = flow.load_trained_model(final_dir, torch.bfloat16).eval(), flow.load_processor(final_dir)
    settings = json.load(open(os.path.join(demo_dir, "run_settings.json")))
    budget = max_new_tokens or settings["prediction"]["MAX_NEW_TOKENS"]
    test_dir = os.path.join(demo_dir, "demo-dataset", "test")  # the test split alone travels
    test = flow.JSONLDataset(os.path.join(test_dir, "annotations.jsonl"), test_dir, "extract data in JSON format")
    schema = flow.read_saved_schema(final_dir)
    validator = Draft202012Validator(schema)
    result = {"device": device, "pages": len(test), "max_new_tokens": budget}
    for constrained in (False, True):
        name = "constrained" if constrained else "free"
        constraint = flow.build_constraint(schema, processor, constrained)
        rows = {}
        for path in ("today", "compiled"):
            fast = FastDecoding(True, compiled=compiled, devices=(device,)) if path == "compiled" else None
            generation = flow.GenerationSettings(torch.bfloat16, budget, 1, 8, fast)
            started = time.perf_counter()
            predicted = list(flow.predict_rows(model, processor, test, generation, constraint=constraint,
                                               with_confidence=False))
            rows[path] = [row["prediction"] for row in predicted]
            result[f"{name}_{path}_field_f1"] = round(compute_metrics(predicted)["field_f1"], 4)  # as right, or not?
            result[f"{name}_{path}_s"] = round(time.perf_counter() - started, 1)
            if fast is not None:
                result[f"{name}_compiled_path"] = f"fell back: {fast.failed}" if fast.failed else \
                    "compiled step" if compiled else "static cache, uncompiled"
        first_differing = []
        for new, old in zip(rows["compiled"], rows["today"]):
            if new != old:
                a, b = (processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in (new, old))
                first_differing.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
        result[f"{name}_identical"] = len(test) - len(first_differing)
        result[f"{name}_first_differing_tokens"] = first_differing
        if constrained:
            result["constrained_fit_schema"] = {path: sum(parse_json(text) is not None and
                                                          validator.is_valid(parse_json(text)) for text in texts)
                                                for path, texts in rows.items()}
    return result


@dataclass(frozen=True)
class Part:
    name: str
    run: object  # Context -> figures
    cap_s: float  # on a GPU; --smoke scales it (a CPU is slower)
    quick: bool  # in `--quick`


PARTS = [
    Part("demo", demo, 150, True),
    Part("real-width-lora", real_width_lora, 180, True),
    Part("qlora", qlora, 120, False),
    Part("checkpointing", checkpointing, 90, False),
    Part("freeze-vision", freeze_vision, 90, False),
    Part("predict", predict, 60, True),
    Part("merge", merge, 180, True),
    Part("resume", resume, 150, True),
    Part("decoding", decoding, 240, False),  # the decoding issue's; `--parts decoding,generation` alone
]
# --goals: (part, cap, the time expected on an H100/H200, from the loans so far and the parts' sizes).
# The caps sum to 530 s, inside 9 minutes: room in a 15-minute loan for the machine's start and one rerun.
GOALS = [
    (Part("goals-run", goals_run, 170, False), 120),  # model built ~30 s, loaded ~20, 4 steps, a compile ~60, decoding ~25
    (Part("decoding", decoding, 120, False), 80),  # two --predict runs of 24 pages: load ~20 s each, one compile
]
GOALS_AFTER = [(Part("bf16-agreement", bf16_agreement, 90, False), 50)]  # after generation: the tiny model, 2 compiles


# --- Child jobs ------------------------------------------------------------------------------------

def build_real_width_model(demo_model: str, target: str, shape: dict) -> dict:
    """PaliGemma 2 3B's real widths, the demo's tokenizer and vocabulary, random weights; saved with a
    processor of the model's image size, so `from_pretrained(target)` loads both as for a Hub model."""
    import torch
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    from paligemma_json.architecture import image_tokens, paligemma2_config
    from real_width import random_model
    tokenizer = PaliGemmaProcessor.from_pretrained(demo_model).tokenizer
    config = paligemma2_config("3b", shape["image_size"], shape["text_layers"], shape["vision_layers"])
    config.text_config.vocab_size = len(tokenizer)  # the demo's; a 257k embedding would dwarf a few layers
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(config.text_config, name, getattr(tokenizer, name))
    size, tokens = shape["image_size"], image_tokens(config)
    processor = PaliGemmaProcessor(image_processor=SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_seq_length=tokens, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a 3B's random fill is minutes on a CPU
    model = random_model(config, device)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "image_size": size, "layers": f"{config.text_config.num_hidden_layers}+"
                                          f"{config.vision_config.num_hidden_layers}"}


def label_log_probs(model, inputs: dict, labels) -> "torch.Tensor":
    """Each label token's log-probability given the image, the prompt and the label before it."""
    import torch
    with torch.inference_mode():
        logits = model(**inputs).logits.float()
    chosen = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
    return chosen[labels[:, 1:] != -100]


def compare_merge(run_dir: str, images_split: str) -> dict:
    """Label log-probs of merged/ against final/'s adapter, and of the base alone, all in fp32."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    import finetune_paligemma2 as flow
    from paligemma_json.devices import model_device_map
    from paligemma_json.training import without_label_only
    processor = flow.load_processor(os.path.join(run_dir, "final"))
    rows = [flow.JSONLDataset(os.path.join(images_split, "annotations.jsonl"), images_split, "extract data in JSON "
                              "format")[index] for index in range(SMALL_SPLITS["test"])]
    batch = without_label_only(flow.collate_fn(rows, processor, torch.float32, with_labels=True))
    labels = batch.pop("labels")
    adapter = flow.load_trained_model(os.path.join(run_dir, "final"), torch.float32).eval()
    inputs = {key: value.to(adapter.device) for key, value in batch.items()}
    labels = labels.to(adapter.device)
    with_adapter = label_log_probs(adapter, inputs, labels)
    with adapter.disable_adapter():
        without = label_log_probs(adapter, inputs, labels)
    del adapter
    merged = PaliGemmaForConditionalGeneration.from_pretrained(os.path.join(run_dir, "merged"), dtype=torch.float32,
                                                               device_map=model_device_map()).eval()
    merged_log_probs = label_log_probs(merged, inputs, labels)
    return {"label_tokens": int(with_adapter.numel()),
            "merged_vs_adapter": float((merged_log_probs - with_adapter).abs().max()),
            "base_vs_adapter": float((without - with_adapter).abs().max()),
            "log_prob_scale": float(with_adapter.abs().mean())}


def main(argv=None) -> None:
    job, *arguments = sys.argv[1:] if argv is None else argv
    if job == "--build-model":
        demo_model, target, shape = arguments
        result = build_real_width_model(demo_model, target, json.loads(shape))
    elif job == "--compare-merge":
        result = compare_merge(*arguments)
    elif job == "--bf16-agreement":
        result = compare_paths_in_bf16(arguments[0], int(arguments[1]))
    else:
        sys.exit(f"{job}: not a job of this file (gpu_check.py runs it: --build-model, --compare-merge)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
