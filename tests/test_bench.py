"""Smoke test of benchmarks/bench.py's pieces, in-process, a few steps each: the benchmark itself
(`python benchmarks/bench.py --quick`) is not part of the suite."""

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402

import finetune_paligemma2 as flow  # noqa: E402


@pytest.fixture(scope="module")
def work(demo_assets):
    dataset_dir, model_dir = demo_assets
    splits = bench.load_demo_splits(dataset_dir)
    return {"dataset_dir": dataset_dir, "model_dir": model_dir, "splits": splits, "schema": flow.label_schema(splits)}


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


def test_report_ends_with_the_speedup_line(capsys):
    def train(rate):
        return {"samples_per_s": rate, "tokens_per_s": rate * 190, "tokens_per_sample": 190.0, "peak_rss_mib": 100.0, "final_loss": 1.0,
                "run_mean_loss": 2.0}

    def infer(rate):
        return {"images_per_s": rate, "peak_rss_mib": 10.0, "valid_json": 24, "images": 24}
    results = {"train/tutorial": [train(10), train(12)], "train/ours": [train(20), train(18)],
               "infer/tutorial": [infer(1), infer(1)], "infer/ours": [infer(5), infer(6)]}
    train_ratio, infer_ratio = bench.print_report(results, 480, 217)
    assert train_ratio == pytest.approx((2.0 + 1.5) / 2)
    assert infer_ratio == pytest.approx(5.5)
    assert re.search(r"samples/s\s+11\.0 \[10\.0-12\.0\]", capsys.readouterr().out)
