"""`--predict` over a backlog (paligemma_json/predict.py): rows streamed into a partial folder and merged in
the folder's order, a cut-off run continued by image identity, a changed setting refused, unreadable
images as rows, the trained run's token budget, memory per document, and (slow) a 2,000-image run killed
and resumed, and two gloo processes against one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
from PIL import Image

import finetune_paligemma2 as flow
from helpers import PROMPT, ROOT, SCRIPT, free_port, read_jsonl, run_flow
from paligemma_json import FlowError
from paligemma_json.documents import DocumentImages
from paligemma_json.plan import Launch, plan_run
from paligemma_json.predict import (BUDGET_RECORD, BYTES_PER_DOCUMENT, PARTIAL, Backlog, prediction_settings,
                                    record_budget, trained_budget)


def write_images(folder, names, seed=0, width=16):
    """Small generated images, each its own noise: the untrained model reads each differently."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for name in names:
        Image.frombytes("RGB", (width, 16), bytes(rng.randrange(256) for _ in range(width * 16 * 3))).save(
            os.path.join(folder, name))


def image_names(count, start=0):
    return [f"IMG_{index:05d}.png" for index in range(start, start + count)]


@pytest.fixture(scope="module")
def saved_final(untrained, tmp_path_factory):
    """A finished run's final/ holding the untrained tiny model (free decoding: no schema)."""
    final = tmp_path_factory.mktemp("backlog") / "final"
    flow.save_final_model(untrained[0], untrained[1], str(final), None)
    return str(final)


@pytest.fixture
def final_run(saved_final, tmp_path):
    """This test's own run folder with that final/."""
    shutil.copytree(saved_final, tmp_path / "run" / "final")
    return str(tmp_path / "run")


def predict(run, folder, resume=False, tokens=6, prompt=PROMPT):
    target = flow.predict_documents(run, str(folder), prompt, flow.GenerationSettings(torch.float32, tokens, batch_size=4),
                                    threshold=0.8, resume=resume)
    return read_jsonl(target)


def test_unreadable_images_are_rows_counted_not_a_stop(final_run, tmp_path, capsys):
    folder = tmp_path / "images"
    write_images(folder, ["a.png", "c.png", "e.png"])
    (folder / "b.jpg").write_bytes(b"")
    (folder / "d.jpg").write_text("a text file named like a photo")
    (folder / "f.jpg").write_bytes((folder / "a.png").read_bytes()[:150])  # cut off mid-file
    rows = predict(final_run, folder)
    printed = capsys.readouterr().out
    assert [row["image"] for row in rows] == ["a.png", "b.jpg", "c.png", "d.jpg", "e.png", "f.jpg"]
    reasons = {row["image"]: row.get("unreadable") for row in rows}
    assert reasons["b.jpg"] == "empty file (0 bytes)"
    assert "cannot identify image file" in reasons["d.jpg"] and "truncated" in reasons["f.jpg"]
    assert not any(reasons[name] for name in ("a.png", "c.png", "e.png"))
    assert all(rows[index]["prediction"] for index in (0, 2, 4))  # the readable ones were read
    assert "predicted: 6 images, 0 parsed as JSON" in printed and "3 unreadable" in printed
    assert "predicted 6 images in " in printed and " images/s)" in printed
    assert not os.path.exists(os.path.join(final_run, PARTIAL))  # removed once merged


def test_a_cut_off_predict_continues_by_image_identity(final_run, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    write_images(folder, image_names(10))
    predict(final_run, folder)
    earlier = open(os.path.join(final_run, "predict.jsonl"), "rb").read()
    real, decoded = flow.predict_rows, []

    def cut_after_one_batch(model, processor, batch, *args, **kwargs):  # the second batch never comes back
        if decoded:
            raise KeyboardInterrupt
        decoded.extend(entry["image"] for entry in batch.entries)
        return real(model, processor, batch, *args, **kwargs)
    monkeypatch.setattr(flow, "predict_rows", cut_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        predict(final_run, folder)
    assert open(os.path.join(final_run, "predict.jsonl"), "rb").read() == earlier  # whole until the new one is done
    part = os.path.join(final_run, PARTIAL, "part-0000.jsonl")
    assert len(read_jsonl(part)) == 4
    with open(part, "a") as file:
        file.write('{"image": "IMG_000')  # a line torn by the kill
    # The folder changes before the resume: one image gone, one grown in size, two new.
    os.remove(folder / "IMG_00001.png")
    write_images(folder, ["IMG_00002.png"], seed=5, width=17)  # another size on disk: predicted again
    write_images(folder, image_names(2, start=10), seed=1)

    def counting(model, processor, batch, *args, **kwargs):
        decoded.extend(entry["image"] for entry in batch.entries)
        return real(model, processor, batch, *args, **kwargs)
    monkeypatch.setattr(flow, "predict_rows", counting)
    decoded.clear()
    resumed = predict(final_run, folder, resume=True)
    printed = capsys.readouterr().out
    assert "resume: kept 2 rows, predicting 9" in printed  # 00000 and 00003 kept; 00002 changed, so predicted again
    assert "a torn last line dropped" in printed and "2 rows of images gone or changed dropped" in printed
    assert sorted(decoded) == sorted(set(image_names(12)) - {"IMG_00000.png", "IMG_00001.png", "IMG_00003.png"})
    assert "predicted 9 images in " in printed and "2 kept from the cut-off run" in printed
    fresh = predict(final_run, folder)  # the same folder, uninterrupted
    assert resumed == fresh and [row["image"] for row in fresh] == sorted(os.listdir(folder))
    assert len({row["prediction"] for row in fresh}) > 1  # the rows differ: an order mix-up would show


def test_resume_refuses_changed_settings_before_the_model_loads(final_run, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    write_images(folder, image_names(3))
    partial = os.path.join(final_run, PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    recorded = prediction_settings(os.path.join(final_run, "final"), PROMPT, 6, None, True, 1, False)
    json.dump(recorded, open(os.path.join(partial, "settings.json"), "w"))
    monkeypatch.setattr(flow, "load_trained_model", lambda *args, **kwargs: pytest.fail("the model loaded"))
    with pytest.raises(FlowError, match=r"changed: the token budget \(MAX_NEW_TOKENS\) \(6, now 7\)\. Pass the"):
        predict(final_run, folder, resume=True, tokens=7)
    with pytest.raises(FlowError, match=r"changed: the prompt \('extract data in JSON format', now 'read it'\)\. Pass"):
        predict(final_run, folder, resume=True, prompt="read it")
    (tmp_path / "other").mkdir()
    other = prediction_settings(str(tmp_path / "other"), PROMPT, 6, None, True, 1, False)  # no weights: another model
    json.dump({**recorded, "model": other["model"]}, open(os.path.join(partial, "settings.json"), "w"))
    with pytest.raises(FlowError, match=r"changed: the model \(final/'s weights\)\. Pass"):
        predict(final_run, folder, resume=True)
    assert os.listdir(partial) == ["settings.json"]  # left there, to be resumed with the right settings


def test_resume_with_nothing_to_continue_predicts_from_the_beginning(final_run, tmp_path, capsys):
    folder = tmp_path / "images"
    write_images(folder, image_names(2))
    assert len(predict(final_run, folder, resume=True)) == 2
    assert "resume: nothing to continue in" in capsys.readouterr().out


def test_without_resume_a_cut_off_partial_is_discarded(final_run, tmp_path, capsys):
    """A row the cut-off run left, with the very settings of this run, is predicted again all the same."""
    folder = tmp_path / "images"
    write_images(folder, image_names(2))
    partial = os.path.join(final_run, PARTIAL)
    os.makedirs(partial)
    recorded = prediction_settings(os.path.join(final_run, "final"), PROMPT, 6, None, True, 1, False)
    json.dump(recorded, open(os.path.join(partial, "settings.json"), "w"))
    left = {"image": "IMG_00000.png", "prediction": "left by the cut-off run", "file_bytes": os.path.getsize(
        folder / "IMG_00000.png")}
    open(os.path.join(partial, "part-0000.jsonl"), "w").write(json.dumps(left) + "\n")
    rows = predict(final_run, folder)
    assert "predict: starting over; the cut-off" in capsys.readouterr().out
    assert len(rows) == 2 and rows[0]["prediction"] != left["prediction"]


def test_resume_applies_to_the_predict_output_only_and_is_refused_with_evaluate_or_merge(tmp_path, capsys):
    (tmp_path / "final").mkdir()  # a finished run: with --predict, --resume must not mention training
    settings = {**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path), "RESUME": True}
    plan = plan_run({**settings, "PREDICT": "photos"})
    assert not plan.training_done and plan.resume_checkpoint is None and "training" not in capsys.readouterr().out
    for mode in ({"EVALUATE": "predictions.jsonl"}, {"MERGE": True}):
        with pytest.raises(FlowError, match=r"has nothing to continue: drop --resume$"):
            plan_run({**settings, **mode})


def test_final_records_the_budget_that_predict_uses_for_0(final_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    trained_budget(str(run / "final"))
    assert "token budget: 1024 (" in capsys.readouterr().out  # saved before it recorded one
    record_budget(str(run / "final"), 3)
    write_images(tmp_path / "images", image_names(2))
    run_flow(monkeypatch, "--output-dir", str(run), "--predict", str(tmp_path / "images"))
    printed = capsys.readouterr().out
    assert f"token budget: 3, as the run trained and evaluated with ({run / 'final'}/{BUDGET_RECORD})" in printed
    rows = read_jsonl(run / "predict.jsonl")
    assert all(row["truncated"] for row in rows) and "2 cut off at the token budget" in printed
    assert rows == predict(str(run), tmp_path / "images", tokens=3) != predict(str(run), tmp_path / "images", tokens=5)


def test_the_demo_runs_final_records_the_budget_it_evaluated_with(run):
    recorded = json.load(open(os.path.join(run[0], "final", BUDGET_RECORD)))["max_new_tokens"]
    assert recorded == json.load(open(os.path.join(run[0], "run_settings.json")))["prediction"]["MAX_NEW_TOKENS"]


def fake_decode(batch):
    """Rows as the script's predict_rows gives them, without a model: the bookkeeping alone is measured."""
    for _, entry in batch:
        yield {"image": entry["image"], "image_path": entry["image"], "prefix": entry["prefix"], "suffix": "",
               "prediction": json.dumps({"route": "x" * 300}), "truncated": False,
               "confidence": [{"field": "route", "value": "x" * 300, "confidence": 0.5, "pointer": "/route"}]}


def test_memory_per_document_stays_under_its_bound(tmp_path, capsys):
    """The peak that listing, predicting (model stubbed) and merging add, at 300 and at 3,000 images: per
    extra document at most BYTES_PER_DOCUMENT. Roboflow-length file names, as a real export has."""
    peaks = {}
    for count in (300, 3000):
        folder, output = tmp_path / f"images-{count}", tmp_path / f"out-{count}"
        os.makedirs(folder)
        for index in range(count):  # tiny files: the bytes on disk are not what is measured
            Image.new("RGB", (4, 4), (index % 256, 0, 0)).save(folder / f"IMG_{index:05d}_jpg.rf.{index:032x}.png")
        os.makedirs(output)
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        Backlog(str(output), DocumentImages(str(folder), PROMPT), {"model": "m"}, False, Launch()).finish(
            fake_decode, 8, 0.8)
        peaks[count] = tracemalloc.get_traced_memory()[1] - start
        tracemalloc.stop()
        assert len(read_jsonl(output / "predict.jsonl")) == count
    per_document = (peaks[3000] - peaks[300]) / 2700
    print(f"peak {peaks[300]} B at 300 images, {peaks[3000]} B at 3000: {per_document:.0f} B per document")
    assert per_document <= BYTES_PER_DOCUMENT


# --- Slow: a backlog of 2,000 images, and several processes --------------------------------------------------

LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port={port}"],
             # `--multi_gpu` is accelerate's working two-CPU-process form (tests/test_launchers.py)
             "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--main_process_port={port}"]}


def script_predict(output_dir, folder, *extra, launcher=None, wait=True):
    launcher = [sys.executable, *(arg.format(port=free_port()) for arg in LAUNCHERS.get(launcher, []))]
    command = [*launcher, SCRIPT, "--output-dir", str(output_dir), "--predict", str(folder), "--max-new-tokens", "4",
               "--eval-batch-size", "8", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


@pytest.mark.slow
def test_a_2000_image_predict_killed_and_resumed_equals_an_uninterrupted_one(final_run, tmp_path):
    """SIGKILL part-way, then `--resume` under two processes: every row once, in the folder's order,
    equal to the uninterrupted one-process run's."""
    folder = tmp_path / "images"
    write_images(folder, image_names(2000))
    whole = tmp_path / "whole"
    shutil.copytree(os.path.join(final_run, "final"), whole / "final")
    script_predict(whole, folder)
    expected = read_jsonl(whole / "predict.jsonl")
    assert [row["image"] for row in expected] == image_names(2000)

    cut = tmp_path / "cut"
    shutil.copytree(os.path.join(final_run, "final"), cut / "final")
    (cut / "predict.jsonl").write_text('{"image": "an earlier run"}\n')
    process = script_predict(cut, folder, wait=False)
    part = cut / PARTIAL / "part-0000.jsonl"
    deadline = time.time() + 600
    while not (part.exists() and part.stat().st_size > 300 * 200) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(part.read_bytes().splitlines())
    assert 0 < written < 2000, written
    assert (cut / "predict.jsonl").read_text() == '{"image": "an earlier run"}\n'  # whole until the end

    result = script_predict(cut, folder, "--resume", launcher="torchrun")
    kept = int(result.stdout.split("resume: kept ")[1].split(" rows")[0])
    assert written - 1 <= kept <= written and f"predicting {2000 - kept}" in result.stdout
    assert read_jsonl(cut / "predict.jsonl") == expected
    assert not (cut / PARTIAL).exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_gloo_processes_give_the_rows_of_one(final_run, tmp_path, launcher):
    folder = tmp_path / "images"
    write_images(folder, image_names(21))
    (folder / "IMG_00005.jpg").write_bytes(b"")  # an unreadable one lands in one process's share
    outputs = []
    for how in (None, launcher):
        output = tmp_path / f"out-{how}"
        shutil.copytree(os.path.join(final_run, "final"), output / "final")
        result = script_predict(output, folder, launcher=how)
        assert "predicted: 22 images" in result.stdout and "1 unreadable" in result.stdout
        assert f"| {22 if how is None else 11}/{22 if how is None else 11} [" in result.stderr  # the first's share
        outputs.append(read_jsonl(output / "predict.jsonl"))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 22
