"""Smoke test of benchmarks/bench.py's pieces, in-process, a few steps each: the benchmark itself
(`python benchmarks/bench.py --quick`) is not part of the suite."""

import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402

import finetune_paligemma2 as flow  # noqa: E402


@pytest.fixture(scope="module")
def work(demo_assets):
    dataset_dir, model_dir = demo_assets
    splits = bench.load_demo_splits(dataset_dir)
    return {"dataset_dir": dataset_dir, "model_dir": model_dir, "splits": splits, "schema": flow.label_schema(splits)}


@pytest.mark.slow  # trains the benchmark's two sides: not CI's (the fast suite is at its budget)
def test_both_sides_train_and_count_tokens_as_the_trainer_does(work, tmp_path):
    splits = work["splits"]
    processor, model = bench.tutorial_load(work["model_dir"])
    trainer = bench.tutorial_trainer(model, processor, splits["train"], splits["valid"], str(tmp_path / "tutorial"),
                                     max_steps=1, learning_rate=2e-3)
    assert trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps == 48
    assert trainer.args.bf16 and trainer.args.optim == "adamw_torch"
    trainer.train()
    # Non-padding tokens per sample, image tokens included: the demo's samples are 163-216 tokens.
    assert 163 * 48 <= trainer.state.num_input_tokens_seen <= 216 * 48

    processor, model = bench.our_load(work["model_dir"])
    trainer = bench.our_trainer(model, processor, splits["train"], splits["valid"],
                                bench.our_settings(str(tmp_path / "ours"), 2))
    trainer.train()
    assert trainer.state.global_step == 2
    assert 163 * 16 <= trainer.state.num_input_tokens_seen <= 216 * 16
    assert not any("eval_loss" in entry for entry in trainer.state.log_history)  # no evaluation while timed
    assert bench.final_training_loss(trainer.model, processor, splits["train"], samples=8) > 0


@pytest.mark.slow  # trains the benchmark's two sides: not CI's (the fast suite is at its budget)
def test_both_sides_predict(work):
    test = bench.first_rows(work["splits"]["test"], 2)
    processor, model = bench.tutorial_load(work["model_dir"])
    assert len(bench.tutorial_predict(model, processor, test, max_new_tokens=4)) == 2
    processor, model = bench.our_load(work["model_dir"])
    texts = bench.our_predict(model, processor, test, max_new_tokens=8, schema=work["schema"])
    assert len(texts) == 2 and all(text.startswith("{") for text in texts)  # the grammar opens the object


def test_peak_rss_delta_sees_an_allocation():
    baseline = bench.reset_peak_rss()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    assert bench.peak_rss_delta_mib(baseline) >= 56
    del block


def bench_results(tutorial_curves, our_curves):
    """Fake bench.py results: each training run ends on its curve's last point, as measure_training's do."""
    def train(rate, curve):
        return {"samples_per_s": rate, "tokens_per_s": rate * 190, "tokens_per_sample": 190.0, "peak_rss_mib": 100.0,
                "final_loss": curve[-1][1], "run_mean_loss": 2.0, "runtime_s": curve[-1][0], "loss_curve": curve}

    def infer(rate):
        return {"images_per_s": rate, "peak_rss_mib": 10.0, "valid_json": 24, "images": 24}
    return {"train/tutorial": [train(rate, curve) for rate, curve in zip((10, 12), tutorial_curves)],
            "train/ours": [train(rate, curve) for rate, curve in zip((20, 18), our_curves)],
            "infer/tutorial": [infer(1), infer(1)], "infer/ours": [infer(5), infer(6)]}


TUTORIAL_CURVE = [(0.0, 8.0), (10.0, 6.0), (20.0, 5.0)]  # ends on its final loss, 5.0, after 20 s


def test_report_ends_with_the_speedup_line(capsys):
    # Ours crosses 5.0 halfway between (2 s, 6.0) and (4 s, 4.0): 3 s, then 5 s in the second repeat.
    results = bench_results([TUTORIAL_CURVE, TUTORIAL_CURVE],
                            [[(0.0, 8.0), (2.0, 6.0), (4.0, 4.0), (40.0, 1.0)], [(0.0, 8.0), (5.0, 5.0), (40.0, 1.0)]])
    train_ratio, infer_ratio, to_loss = bench.print_report(results, 480, 217)
    assert train_ratio == pytest.approx((2.0 + 1.5) / 2)
    assert infer_ratio == pytest.approx(5.5)
    assert to_loss == pytest.approx((20 / 3 + 20 / 5) / 2)
    out = capsys.readouterr().out
    assert re.search(r"samples/s\s+11\.0 \[10\.0-12\.0\]", out)
    assert "its whole run (the target is its own final loss) in 2 of 2 repeats" in out
    assert bench.speedup_line(train_ratio, infer_ratio, to_loss) == (
        "train_speedup=1.75 inference_speedup=5.50 train_time_to_loss_speedup=5.33")


def test_report_says_when_ours_never_reaches_the_tutorials_loss(capsys):
    results = bench_results([TUTORIAL_CURVE, TUTORIAL_CURVE],
                            [[(0.0, 8.0), (2.0, 6.0), (4.0, 4.0)], [(0.0, 8.0), (8.0, 5.5)]])
    *_, to_loss = bench.print_report(results, 480, 217)
    assert to_loss is None
    assert "ours never reached it in 1 of 2 repeats" in capsys.readouterr().out
    assert bench.speedup_line(1.0, 2.0, None).endswith("train_time_to_loss_speedup=not_reached")


@pytest.mark.parametrize("target, expected", [
    (5.0, 3.0),    # linear in time between (2 s, 6.0) and (4 s, 4.0)
    (6.0, 2.0),    # a point exactly on the target: its own time
    (8.5, 0.0),    # already there before training
    (3.5, 4.0 + (4.0 - 3.5) / (4.0 - 3.0) * 2.0),
    (2.9, None),   # never reached
])
def test_time_to_loss_interpolates_between_the_points_that_bracket_the_target(target, expected):
    curve = [(0.0, 8.0), (2.0, 6.0), (4.0, 4.0), (6.0, 3.0)]
    assert bench.time_to_loss(curve, target) == (None if expected is None else pytest.approx(expected))


def test_time_to_loss_takes_the_first_crossing():
    assert bench.time_to_loss([(0.0, 8.0), (2.0, 4.0), (4.0, 6.0), (6.0, 5.0)], 5.0) == pytest.approx(1.5)


def test_the_tutorials_time_is_its_whole_run_unless_an_earlier_point_reached_its_final_loss():
    ours = {"loss_curve": [(0.0, 8.0), (1.0, 2.0)], "runtime_s": 1.0}
    at_end = bench.time_to_tutorial_loss({"final_loss": 5.0, "runtime_s": 20.0, "loss_curve": TUTORIAL_CURVE}, ours)
    assert at_end["tutorial_s"] == 20.0 and at_end["tutorial_at_end"]
    assert at_end["ours_s"] == pytest.approx(0.5)
    # Times where interpolating to the last point would land an ulp off it (1.1 + (5.3 - 1.1) != 5.3).
    odd_times = {"final_loss": 5.0, "runtime_s": 5.3, "loss_curve": [(0.0, 8.0), (1.1, 6.0), (5.3, 5.0)]}
    assert bench.time_to_tutorial_loss(odd_times, ours)["tutorial_at_end"]
    dipped = [(0.0, 8.0), (10.0, 4.0), (20.0, 5.0)]  # its loss went below its final value, then back up
    earlier = bench.time_to_tutorial_loss({"final_loss": 5.0, "runtime_s": 20.0, "loss_curve": dipped}, ours)
    assert earlier["tutorial_s"] == pytest.approx(7.5) and not earlier["tutorial_at_end"]
    with pytest.raises(ValueError, match="must end on its final loss"):
        bench.time_to_tutorial_loss({"final_loss": 5.0, "runtime_s": 20.0, "loss_curve": TUTORIAL_CURVE[:2]}, ours)


def test_curve_steps_are_evenly_spaced_inside_the_run():
    assert bench.curve_steps(10, points=20) == list(range(1, 10))  # the tutorial's quick run: every step
    assert bench.curve_steps(60, points=20) == list(range(3, 60, 3))
    assert bench.curve_steps(1, points=20) == []


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_loss_curve_pauses_the_clock_while_it_measures():
    clock, losses = FakeClock(), iter([8.0, 6.0, 4.0])

    def measure():
        clock.now += 50.0  # measuring takes far longer than training here: none of it may count
        return next(losses)
    curve = bench.LossCurve(measure, steps=[2, 4], clock=clock)
    state = type("State", (), {"global_step": 0})()
    curve.on_train_begin(None, state, None)
    for step in range(1, 6):
        clock.now += 1.0  # one second of training per step
        state.global_step = step
        curve.on_step_end(None, state, None)
    assert curve.points == [(0.0, 8.0), (2.0, 6.0), (4.0, 4.0)]
    assert curve.paused_s == 150.0


class SlowLossCurve(bench.LossCurve):
    """Each loss measurement takes a second longer: time that must not count as training."""

    def __init__(self, measure, steps):
        super().__init__(lambda: time.sleep(1.0) or measure(), steps)


@pytest.mark.slow  # trains the benchmark's two sides: not CI's (the fast suite is at its budget)
def test_the_loss_curve_is_measured_without_changing_or_timing_the_training(work, tmp_path, monkeypatch):
    plain = bench.measure_training("ours", work, 48, str(tmp_path / "plain"))
    monkeypatch.setattr(bench, "LossCurve", SlowLossCurve)
    curved = bench.measure_training("ours", work, 48, str(tmp_path / "curve"), curve_points=3)
    assert curved["loss_measurement_s"] >= 3.0
    # The Trainer's clock ran through the measurements; the run's training time leaves them out.
    # (Compared within one run, not against `plain`: on a loaded machine two runs' times differ by seconds.)
    assert curved["runtime_s"] == pytest.approx(curved["trainer_runtime_s"] - curved["loss_measurement_s"])
    assert curved["trainer_runtime_s"] >= 3.0 + curved["runtime_s"] * 0.99
    points = curved["loss_curve"]
    assert len(points) == 4  # the start, steps 2 and 4 of 6, and the final loss
    assert points[0][0] == 0.0 and list(points[-1]) == [curved["runtime_s"], curved["final_loss"]]
    assert all(a[0] < b[0] for a, b in zip(points, points[1:]))
    assert points[0][1] > points[-1][1]
    assert curved["loss_measurement_s"] > 0
    assert curved["final_loss"] == plain["final_loss"] and plain["loss_curve"] == []


CHILD = """import json, os, sys
assert sys.argv[1] == "--child"
print("the flow's own prints come first")
if sys.argv[2] == "fail":
    sys.exit("the child's own error")
print(json.dumps({"arguments": sys.argv[2:], "cwd": os.getcwd(), "added": os.environ.get("ADDED")}))
"""


def test_every_variant_runs_in_its_own_process_and_returns_its_last_line(tmp_path, monkeypatch):
    """benchmarks/runner.py, which bench.py, levers.py, memory_levers.py, confidence_memory.py and
    real_width.py share: `script --child ...` from the repository root, its last stdout line back."""
    from runner import ROOT, ChildFailed, run_child
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    monkeypatch.chdir(tmp_path)  # the child still runs from the repository root
    result = run_child(str(script), ["a", "--steps", "2"], "a", env={"ADDED": "yes"})
    assert result == {"arguments": ["a", "--steps", "2"], "cwd": ROOT, "added": "yes"}
    with pytest.raises(ChildFailed, match="fail failed:\n.*the child's own error") as failure:
        run_child(str(script), ["fail"], "fail")
    assert failure.value.stderr.strip() == "the child's own error"
