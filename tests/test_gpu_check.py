"""benchmarks/gpu_check.py, the one call a lent GPU gets: the four defects an H200 found in it, each
shown here without a GPU, and (slow) its --smoke, every part on the CPU."""

import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_script  # noqa: E402
import real_width  # noqa: E402

SMOKE_PARTS = ["demo", "real-width-lora", "qlora", "checkpointing", "freeze-vision", "predict", "merge", "resume",
               "decoding", "memory-lora-224", "memory-full-224", "generation", "memory-qlora-224", "memory-levers-224",
               "memory-liger-224"]


# --- 1. The random weights are drawn on the parameters' own device ----------------------------------

def spy_on_generators(monkeypatch) -> list[tuple[torch.device, torch.device]]:
    """(parameter's device, the device its generator was asked for) per `normal_`. A meta tensor ignores
    the generator, so the generator is made on the CPU whatever was asked, and the asked device recorded."""
    asked, drawn = {}, []
    real_generator, real_normal = torch.Generator, torch.Tensor.normal_

    def generator(device="cpu"):
        made = real_generator()
        asked[id(made)] = torch.device(device)
        return made

    def normal_(tensor, *args, generator=None, **kwargs):
        drawn.append((tensor.device, asked.get(id(generator), torch.device("cpu"))))
        return real_normal(tensor, *args, generator=generator, **kwargs)
    monkeypatch.setattr(torch, "Generator", generator)
    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    return drawn


def test_random_weights_are_drawn_by_a_generator_on_the_parameters_device(monkeypatch):
    # On an H200 a CPU generator filling CUDA parameters stopped every training part of the check.
    with torch.device("meta"):  # stands for "not the CPU": a GPU's parameters
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    drawn = spy_on_generators(monkeypatch)
    real_width.fill_random(model, seed=0)
    assert len(drawn) == 4
    assert all(generator == parameter for parameter, generator in drawn), drawn


def test_saved_model_fills_its_weights_through_fill_random(monkeypatch, tmp_path):
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    import paligemma_json.architecture
    tiny = PaliGemmaConfig(
        text_config=Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, head_dim=16),
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, image_size=28, patch_size=14),
        projection_dim=16, image_token_index=63)
    monkeypatch.setattr(paligemma_json.architecture, "paligemma2_config", lambda *shape: tiny)
    filled = []
    monkeypatch.setattr(real_width, "fill_random", lambda model, seed=0: filled.append(model))
    real_width.saved_model("3b", 28, 1, 1, str(tmp_path))
    assert len(filled) == 1


# --- 2. `--only generation`: no training rows to take a lever's ratio of -----------------------------

def test_the_table_prints_with_generation_rows_only(capsys):
    generated = {"variant": "none", "images": 1, "steps": 4, "seconds": 0.4, "s_per_step": 0.1,
                 "added_above_weights": None}
    assert gpu_check.lever_lines([]) == []
    gpu_check.print_table([], [generated], "CPU")
    assert "generate none" in capsys.readouterr().out


# --- 3. A Liger that does not work with this transformers costs only its variant --------------------

class FakeTrainer:
    """The Trainer's training_step on a linear layer; `broken` makes it fail as Liger's patched forward did."""

    def __init__(self, model, events):
        self.model, self.events, self.broken = model, events, None

    def training_step(self, wrapped, inputs, num_items_in_batch=None):
        self.events.append("step")
        if self.broken:
            raise self.broken
        loss = wrapped.layer(inputs["x"]).sum()
        loss.backward()
        return loss.detach()


def fake_harness(monkeypatch, liger_raises_in: str):
    """gpu_check's training harness over a one-layer stand-in, with a stub liger_kernel whose PaliGemma
    patch fails as liger-kernel 0.8.5 did with transformers 5.24 (in the patch, or in the patched forward)."""
    events = []
    model = types.SimpleNamespace(layer=torch.nn.Linear(3, 1), config=None)
    model.parameters = model.layer.parameters
    model.get_base_model = lambda: model
    trainer = FakeTrainer(model, events)
    error = AttributeError(gpu_check.KNOWN_LIGER_FAILURE)

    def apply_liger_kernel_to_paligemma(model):
        if liger_raises_in == "patch":
            raise error
        trainer.broken = error
    liger = types.ModuleType("liger_kernel")
    liger.transformers = types.SimpleNamespace(apply_liger_kernel_to_paligemma=apply_liger_kernel_to_paligemma)
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", liger.transformers)
    monkeypatch.setattr(gpu_check, "load", lambda shape: (model, trainer, model, torch.float32))
    monkeypatch.setattr(gpu_check, "synthetic_batch", lambda config, batch, dtype, label_only: {
        "x": torch.ones(batch, 3), "labels": torch.ones(batch, 4, dtype=torch.long)})
    monkeypatch.setattr(gpu_check, "predicted", lambda *setting: {})
    monkeypatch.setattr(gpu_check, "without_label_only", lambda inputs: inputs)
    return events


@pytest.mark.parametrize("where", ["patch", "forward"])
def test_a_failing_liger_is_reported_skipped_and_costs_only_its_variant(monkeypatch, where):
    events = fake_harness(monkeypatch, where)
    plain, fused = gpu_check.variant(1, timed=True), gpu_check.variant(1, label_only=False, timed=True, liger=True)
    args = types.SimpleNamespace(layers=(1, 1), work_dir="", warmup=0, repeats=1)

    # Liger patches classes, so the plan gives it the last variant of a model (a process) of its own.
    rows = gpu_check.train_model("lora", 224, [plain, plain, fused], args,
                                 on_row=lambda row: events.append(("row", "skipped" in row)))
    assert [("skipped" in row) for row in rows] == [False, False, True]
    assert all("step_s" in row for row in rows[:2])
    reason = rows[2]["skipped"]
    assert reason.startswith("incompatible: liger-kernel") and "transformers" in reason
    assert gpu_check.KNOWN_LIGER_FAILURE in reason and "known:" in reason
    # Each row is handed on as soon as it is measured, before the next variant's steps (defect 4).
    assert events.index(("row", False)) < events.index("step", events.index(("row", False)))
    status, why = gpu_check.memory_status("memory-liger-448", {"training": [rows[2]], "generation": []}, False)
    assert status == "skipped" and why == reason


def test_a_variant_that_fails_costs_only_itself(monkeypatch):
    fake_harness(monkeypatch, "patch")
    real_step, calls = FakeTrainer.training_step, []

    def out_of_memory_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the warm-up step is the first
            raise RuntimeError("CUDA out of memory")
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(FakeTrainer, "training_step", out_of_memory_once)
    args = types.SimpleNamespace(layers=(1, 1), work_dir="", warmup=0, repeats=1)
    rows = gpu_check.train_model("lora", 224, [gpu_check.variant(1), gpu_check.variant(1)], args)
    assert rows[0]["skipped"] == "failed: RuntimeError: CUDA out of memory" and "first_step_s" in rows[1]
    assert gpu_check.memory_status("memory-lora-224", {"training": rows, "generation": []}, False)[0] == "failed"


# --- 4. Each part is printed and saved as it ends ----------------------------------------------------

def test_each_part_is_printed_and_saved_as_it_ends_and_a_failure_costs_only_its_part(monkeypatch, tmp_path,
                                                                                         capsys):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    seen = {}

    def first(context):
        return {"figure": 1.5}

    def crashing(context):
        raise RuntimeError("a crash")

    def last(context):  # the earlier parts are on screen and on disk before this one ends
        seen["printed"] = capsys.readouterr().out
        seen["saved"] = json.loads((out / "gpu_check.json").read_text())
        return {}
    Part = gpu_check_script.Part
    parts = [Part("first", first, 60, True), Part("crashing", crashing, 60, True), Part("last", last, 60, True)]
    monkeypatch.setattr(gpu_check_script, "PARTS", parts)
    gpu_check.main(["--smoke", "--quick", "--work-dir", str(tmp_path / "work")])
    assert "part first: ok" in seen["printed"] and "figure=1.5" in seen["printed"]
    assert "part crashing: failed" in seen["printed"] and "a crash" in seen["printed"]
    assert [(p["name"], p["status"]) for p in seen["saved"]["parts"]] == [("first", "ok"), ("crashing", "failed")]
    final = json.loads((out / "gpu_check.json").read_text())
    assert [p["status"] for p in final["parts"]] == ["ok", "failed", "ok"]


def test_a_hanging_run_costs_only_its_cap(tmp_path):
    context = gpu_check_script.Context(smoke=True, work_dir=str(tmp_path), log_path=str(tmp_path / "runs.log"),
                                       deadline=time.time() + 1)
    started = time.time()
    with pytest.raises(RuntimeError, match="cut off"):
        gpu_check_script.run_logged([sys.executable, "-c", "import time; print('started', flush=True); "
                                     "time.sleep(60)"], context, "hang")
    assert time.time() - started < 15
    assert "started" in (tmp_path / "runs.log").read_text()


def test_parts_past_the_budget_are_skipped_saying_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check_script, "PARTS", [gpu_check_script.Part("late", lambda context: {}, 60, True)])
    gpu_check.main(["--smoke", "--quick", "--budget-s", "5", "--work-dir", str(tmp_path / "work")])
    assert "part late: skipped (0 s): out of time" in capsys.readouterr().out


# --- 5. The decoding part reads decoding.jsonl: a fallback is never taken for a speed-up -------------

def record(path: str, wall: float, **more) -> dict:
    return {"split": "predict", "pass": "constrained", "images": 24, "path": path, "split_wall_s": wall, "seconds": wall,
            "compile_s": more.pop("compile_s", 0.0), "ms_per_step": more.pop("ms_per_step", 40.0), "graphs_compiled": 0,
            "recompilations": 0, "cudagraph_skips": None, "reason": more.pop("reason", None), **more}


@pytest.mark.parametrize("fast_path", ["dynamic cache, fallen back", "compiled step"])
def test_the_decoding_part_reads_which_path_decoded_from_decoding_jsonl(monkeypatch, tmp_path, fast_path):
    """Each --predict prints "decoding: constrained to the labels' schema (llguidance)" before it decodes,
    on every path: the part once took that line for the fast run's note and reported a speed-up for a run that
    had fallen back. Now each run's figures and path come from the line it appended to decoding.jsonl."""
    lora_dir, images = tmp_path / "run", tmp_path / "images"
    lora_dir.mkdir()
    images.mkdir()
    for index in range(24):
        (images / f"{index}.jpg").write_bytes(b"")
    written = {"fast": record(fast_path, 30.0, compile_s=10.0, ms_per_step=12.0, reason="RuntimeError: no graphs"
                              if "fallen" in fast_path else None),
               "today": record("dynamic cache", 60.0, reason="--no-fast-decoding")}

    def run_script(arguments, context, label, timeout=None):
        with open(lora_dir / "decoding.jsonl", "a") as out:
            out.write(json.dumps(written[label.split("-")[1]]) + "\n")
        return {"rc": 0, "seconds": 1.0, "stdout": "decoding: constrained to the labels' schema (llguidance)\n"
                                                     "decoded 24 images in 5.0 s (...): predict, constrained\n"}
    monkeypatch.setattr(gpu_check_script, "run_script", run_script)
    monkeypatch.setattr(gpu_check_script, "test_images", lambda *args: str(images))
    context = gpu_check_script.Context(smoke=False, work_dir=str(tmp_path), log_path=str(tmp_path / "runs.log"),
                                       made={"lora_dir": str(lora_dir), "train_samples_per_s": 10.0})
    figures = gpu_check_script.decoding(context)
    assert (figures["fast_path"], figures["fast_s"], figures["today_s"]) == (fast_path, 30.0, 60.0)
    if fast_path == "compiled step":
        assert (figures["speedup"], figures["steady_speedup"]) == (2.0, round(40 / 12, 2))
        # the compilation once, the rest per page: 20 x 16 + 16 + 2 x 24 pages at (30 - 10) / 24 s, plus 10 s
        assert figures["default_run_pages_decoded"] == 384
        assert figures["default_run_decoding_fast_s"] == round(384 * 20 / 24 + 10)
    else:
        assert "speedup" not in figures and figures["fast_reason"] == "RuntimeError: no graphs"


# --- 6. --goals: the parts in order of value, capped; the table says which path produced each figure ------

def test_the_goals_parts_are_capped_within_nine_minutes_in_order_of_value():
    plan = gpu_check.goals_plan()
    assert [part.name for part, _, _ in plan] == ["goals-run", "decoding", "generation", "bf16-agreement"]
    assert sum(cap for _, cap, _ in plan) <= 540 and all(expected < cap for _, cap, expected in plan)


def goals_data(test_paths, fits=24, none_fast_ms=10.0):
    generation = [{"variant": "none-fast", "s_per_step": none_fast_ms / 1e3, "path": "compiled step"},
                  {"variant": "constrained-fast", "s_per_step": 0.0115, "extra_s_per_step": 0.0015,
                   "extra_share": 0.15, "path": "compiled step"},
                  {"variant": "lora-fast", "skipped": "failed: RecompileLimitExceeded", "path": "fell back: ..."}]
    parts = [{"name": "goals-run", "status": "ok", "reason": "", "figures": {
                 "test_step_s": 12.0, "test_paths": test_paths, "run_compile_s": 30.0, "test_compile_s": 0.0,
                 "printed": ["training: ...", "MFU: 21.0% of ..."]}},
             {"name": "decoding", "status": "ok", "reason": "", "figures": {
                 "fast_path": "compiled step", "default_run_decoding_fast_s": 300, "default_run_training_s": 900}},
             {"name": "generation", "status": "failed", "reason": "failed: RecompileLimitExceeded", "figures": {}},
             {"name": "bf16-agreement", "status": "skipped", "reason": "no trained demo", "figures": {}}]
    return {"parts": parts, "generation": generation}


def test_the_goals_table_judges_each_row_by_the_path_that_produced_it():
    goals = {row["row"]: row for row in gpu_check.judge_goals(goals_data(["compiled step"]), smoke=False)}
    assert [row["row"] for row in goals.values()] == [row[0] for row in gpu_check.GOAL_ROWS]
    assert goals["plain greedy"]["status"] == "met" and goals["plain greedy"]["path"] == "compiled step"
    assert goals["schema constraint"]["status"] == "not met"
    assert goals["unmerged LoRA r8"]["status"].startswith("not measured (part generation failed")
    assert goals["the test step"]["status"] == "not met"  # 12 s decoding + 30 s compiling at validation > 20 s
    assert goals["default run"]["status"] == "met"
    assert goals["bf16 agreement"]["status"] == "not measured (part bf16-agreement skipped: no trained demo)"
    assert goals["training MFU"]["status"] == "met (reported)"
    fallen = {row["row"]: row for row in gpu_check.judge_goals(goals_data(["dynamic cache, fallen back"],
                                                                          none_fast_ms=30), smoke=False)}
    assert fallen["the test step"]["status"].startswith("not met (the fast path did not produce it")
    assert fallen["plain greedy"]["status"] == "not met"


def test_on_the_cpu_every_goal_is_not_measured():
    goals = gpu_check.judge_goals(goals_data(["static cache, uncompiled"]), smoke=True)
    assert {row["status"] for row in goals} == {"not measured (CPU)"}


# --- The whole check on the CPU ----------------------------------------------------------------------

def part_results(output: str) -> dict[str, str]:
    """{part: "ok" / "failed: ..." / "skipped: ..."} from the check's `part NAME: STATUS (N s)...` lines."""
    results = {}
    for line in output.splitlines():
        if line.startswith("part ") and ": " in line and " s)" in line:
            name, rest = line[len("part "):].split(": ", 1)
            status, _, after = rest.partition(" (")
            results[name] = status if status == "ok" else f"{status}: {after.split(': ', 1)[-1]}"
    return results


def liger_missing() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.slow
def test_smoke_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke",
                             "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OUT": str(out)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = part_results(result.stdout)
    assert list(results) == SMOKE_PARTS, result.stdout[-3000:]
    expected = {name: "ok" for name in SMOKE_PARTS}
    expected["memory-full-224"] = results["memory-full-224"]  # by design: its AdamW state passes 8 GiB on a CPU
    assert results["memory-full-224"].startswith("skipped: --smoke")
    if liger_missing():
        expected["memory-liger-224"] = "skipped: not installed (liger_kernel.transformers)"
    assert results == expected, result.stdout[-3000:]
    saved = json.loads((out / "gpu_check.json").read_text())
    assert [part["name"] for part in saved["parts"]] == SMOKE_PARTS
    assert len(os.listdir(out)) <= 8  # what the device tool returns


@pytest.mark.slow
def test_goals_smoke_runs_every_part_on_the_cpu_and_prints_the_table(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--goals", "--smoke",
                             "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=3000,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OUT": str(out)})
    assert result.returncode == 0, result.stderr[-3000:]
    results = part_results(result.stdout)
    assert results == {name: "ok" for name in ("goals-run", "decoding", "generation", "bf16-agreement")}, \
        result.stdout[-3000:]
    table = [line for line in result.stdout[result.stdout.index("== goals on"):].splitlines()
             if line.startswith("| ")][1:]  # the rows, below the header
    assert len(table) == len(gpu_check.GOAL_ROWS) and all("| not measured (CPU) |" in line for line in table), table
    saved = json.loads((out / "gpu_check.json").read_text())
    run = next(part for part in saved["parts"] if part["name"] == "goals-run")["figures"]
    assert {(d["split"], d["pass"]) for d in run["decodings"]} >= {("valid", "free"), ("test", "constrained"),
                                                                   ("test", "free")}
    assert os.listdir(out / "logs")  # each run's whole output, torch's logs in it
