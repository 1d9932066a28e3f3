"""A `--resume` never mixes two runs: the settings a run was made with are recorded in
`OUTPUT_DIR/run_settings.json`; a resume that would change the training is refused, before the
model loads, while training is not finished; one that would change the predictions re-predicts
every row. One short run, in this process; then cheap resume attempts on copies of it."""

import json
import os
import shutil

import pytest
from transformers import PaliGemmaForConditionalGeneration

from helpers import run_flow, short_run_args
from paligemma_json import FlowError
from paligemma_json.run_record import RECORD_NAME, short_hash

BASE = ("--max-steps", "4", "--save-steps", "4", "--max-new-tokens", "20", "--no-dataset-report",
        "--confidence-threshold", "0.8")


class ModelLoads(Exception):
    """Raised where the model would load: the settings check let the resume through."""


@pytest.fixture(scope="module")
def finished_run(demo_assets, small_export, tmp_path_factory):
    """A finished 4-step full fine-tune, with its one checkpoint, final/ and predictions."""
    output_dir = tmp_path_factory.mktemp("settings") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], output_dir, *BASE))
    return output_dir


@pytest.fixture
def resume(demo_assets, small_export, monkeypatch):
    """`resume(output_dir, *flags)`: the short run's command again with `--resume` and `flags`,
    stopped where the model would load."""
    def from_pretrained(*args, **kwargs):
        raise ModelLoads()
    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "from_pretrained", from_pretrained)

    def run(output_dir, *flags):
        with pytest.raises(ModelLoads):
            run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], output_dir, *BASE, "--resume", *flags))
    return run


def copy_of(run_dir, tmp_path, finished=True):
    """A copy of the short run; not `finished`: cut off after its checkpoint, before final/."""
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    if not finished:
        for name in ("final", "predictions.jsonl", "metrics.json", "report.html", "predictions.png"):
            path = target / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return target


def record(output_dir):
    return json.loads((output_dir / RECORD_NAME).read_text())


def test_the_record_holds_what_shapes_the_training_and_the_predictions(finished_run, small_export):
    saved = record(finished_run)
    assert set(saved) == {"training", "prediction"}
    training, prediction = saved["training"], saved["prediction"]
    assert training["LEARNING_RATE"] == 2e-3 and training["EFFECTIVE_BATCH"] == 4 and training["MAX_STEPS"] == 4
    assert training["SEED"] == 3 and training["USE_LORA"] is False and training["SAVE_STEPS"] == 4
    assert prediction["MAX_NEW_TOKENS"] == 20 and prediction["NUM_BEAMS"] == 1 and prediction["CONSTRAINED"] is True
    assert prediction["PROMPT"] == training["PROMPT"] == "extract data in JSON format"
    assert prediction["SCHEMA"] == short_hash(json.loads((finished_run / "schema.json").read_text()))
    rows = [json.loads(line) for split in ("train", "valid")
            for line in open(os.path.join(small_export, split, "annotations.jsonl"))]
    assert training["TRAIN_DATA"] == short_hash([(row["image"], row["suffix"]) for row in rows])
    assert training["CORRECTIONS"] == []  # none given; else each export or folder as given
    assert os.path.isdir(training["MODEL_ID"])  # a local model, by its absolute path
    # Unrecorded, so free to differ: what changes neither; what does nothing in this mode.
    recorded = set(training) | set(prediction)
    assert not recorded & {"EVAL_BATCH_SIZE", "LOGGING_STEPS", "DATASET_REPORT", "BATCH_SIZE", "GRAD_ACCUM",
                           "LORA_RANK", "LORA_TARGET_MODULES", "EPOCHS", "OUTPUT_DIR"}


@pytest.mark.parametrize("flags, named", [
    (["--learning-rate", "1e-3"], "LEARNING_RATE was 0.002, now 0.001"),
    (["--batch-size", "2"], "the effective batch (BATCH_SIZE x GRAD_ACCUM x processes) was 4, now 2"),
    (["--max-steps", "6"], "MAX_STEPS was 4, now 6"),
    (["--use-lora"], "USE_LORA was False, now True"),
    (["--freeze-vision"], "FREEZE_VISION was False, now True"),
    (["--seed", "4"], "SEED was 3, now 4"),
    (["--warmup-steps", "2"], "WARMUP_STEPS was 0, now 2"),
    (["--prompt", "read it"], "PROMPT was 'extract data in JSON format', now 'read it'"),
    (["--num-beams", "2"], "NUM_BEAMS was 1, now 2"),  # validation generates with it: it picks the best
    (["--max-new-tokens", "0"], "MAX_NEW_TOKENS was 20, now "),  # resolved in step 4, still before the model
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_a_resume_that_would_mix_two_trainings_is_refused_before_the_model_loads(
        finished_run, tmp_path, resume, flags, named):
    output_dir = copy_of(finished_run, tmp_path, finished=False)
    before = record(output_dir)
    with pytest.raises(FlowError) as refused:
        resume(output_dir, *flags)
    message = str(refused.value)
    assert named in message and "training is not finished" in message and "--overwrite" in message
    assert "\n" not in message
    assert record(output_dir) == before


def test_a_resume_on_another_model_or_data_is_refused(finished_run, demo_assets, small_export, tmp_path, resume):
    output_dir = copy_of(finished_run, tmp_path, finished=False)
    other_model = shutil.copytree(demo_assets[1], tmp_path / "other-model")
    with pytest.raises(FlowError, match="MODEL_ID was .* now .*other-model"):
        resume(output_dir, "--model-id", str(other_model))
    other_data = shutil.copytree(small_export, tmp_path / "other-data")
    labels = other_data / "train" / "annotations.jsonl"
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    rows[0]["suffix"] = json.dumps({**json.loads(rows[0]["suffix"]), "note": "fragile"})  # a field more: another schema
    labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    schema = (output_dir / "schema.json").read_bytes()
    with pytest.raises(FlowError, match="the train/valid rows"):
        resume(output_dir, "--dataset-dir", str(other_data))
    assert (output_dir / "schema.json").read_bytes() == schema  # refused before step 3 writes the new one


def test_settings_that_change_neither_may_differ(finished_run, tmp_path, resume):
    output_dir = copy_of(finished_run, tmp_path, finished=False)
    before = record(output_dir)
    resume(output_dir, "--eval-batch-size", "4", "--logging-steps", "2", "--batch-size", "2", "--grad-accum", "2",
           "--lora-rank", "4", "--epochs", "3")  # the same effective batch; no LoRA; MAX_STEPS rules
    assert record(output_dir) == before


def test_a_finished_training_ignores_training_settings_but_not_its_model(finished_run, tmp_path, resume, capsys,
                                                                        demo_assets):
    output_dir = copy_of(finished_run, tmp_path)
    predictions = (output_dir / "predictions.jsonl").read_bytes()
    resume(output_dir, "--learning-rate", "1e-3")
    printed = capsys.readouterr().out
    assert "note: training is finished, so these change nothing: LEARNING_RATE was 0.002, now 0.001" in printed
    assert (output_dir / "predictions.jsonl").read_bytes() == predictions
    assert record(output_dir)["training"]["LEARNING_RATE"] == 2e-3  # what trained final/
    other_model = shutil.copytree(demo_assets[1], tmp_path / "other-model")
    with pytest.raises(FlowError, match="final/ was trained from the earlier model"):
        resume(output_dir, "--model-id", str(other_model))


def test_other_decoding_settings_re_predict_every_row(finished_run, demo_assets, small_export, tmp_path,
                                                      monkeypatch, capsys):
    output_dir = copy_of(finished_run, tmp_path)
    earlier = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    assert all("free_prediction" in row for row in earlier)  # constrained: decoded twice
    (output_dir / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in earlier[:5]))  # cut off
    (output_dir / "validation_predictions.jsonl").write_text("")  # decoded the earlier way too
    flow = run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], output_dir, *BASE, "--resume",
                                                 "--no-constrained"))
    printed = capsys.readouterr().out
    assert ("resume: re-predicting every row, since CONSTRAINED was True, now False; removed predictions.jsonl, "
            "validation_predictions.jsonl, metrics.json, final/confidence.json") in printed
    assert not (output_dir / "validation_predictions.jsonl").exists()
    assert "already in" not in printed  # none of the earlier rows kept
    rows = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    assert len(rows) == len(earlier) and not any("free_prediction" in row for row in rows)
    assert flow["metrics"] == json.loads((output_dir / "metrics.json").read_text())
    saved = record(output_dir)
    assert saved["prediction"]["CONSTRAINED"] is False and saved["training"] == record(finished_run)["training"]


@pytest.mark.parametrize("flags, change", [
    (("--max-new-tokens", "30"), "MAX_NEW_TOKENS was 20, now 30"),
    (("--num-beams", "2"), "NUM_BEAMS was 1, now 2"),
    (("--prompt", "read the manifest"), "PROMPT was 'extract data in JSON format', now 'read the manifest'")])
def test_settings_of_both_training_and_prediction_re_predict_a_finished_run(finished_run, tmp_path, resume, capsys,
                                                                            flags, change):
    """They shaped the training too (validation decodes with them), yet once final/ exists they only change
    the predictions: the earlier rows go, rather than sit beside rows decoded the new way."""
    output_dir = copy_of(finished_run, tmp_path)
    earlier = (output_dir / "predictions.jsonl").read_text().splitlines(keepends=True)
    (output_dir / "predictions.jsonl").write_text("".join(earlier[:5]))  # cut off
    resume(output_dir, *flags)
    assert f"resume: re-predicting every row, since {change}; removed predictions.jsonl" in capsys.readouterr().out
    assert not (output_dir / "predictions.jsonl").exists()
    name, value = flags[0][2:].upper().replace("-", "_"), flags[1]
    assert str(record(output_dir)["prediction"][name]) == value


def test_a_cut_off_training_may_change_prediction_only_settings(finished_run, tmp_path, resume):
    output_dir = copy_of(finished_run, tmp_path, finished=False)
    resume(output_dir, "--no-constrained")  # nothing predicted yet, so nothing to mix
    assert record(output_dir)["prediction"]["CONSTRAINED"] is False


def test_an_older_run_without_a_record_resumes_with_a_note(finished_run, tmp_path, resume, capsys):
    output_dir = copy_of(finished_run, tmp_path, finished=False)
    (output_dir / RECORD_NAME).unlink()
    resume(output_dir, "--learning-rate", "1e-3")
    assert f"has no {RECORD_NAME}" in capsys.readouterr().out
    assert record(output_dir)["training"]["LEARNING_RATE"] == 1e-3  # checked against from now on


def test_the_record_names_each_corrections_path_as_given(tmp_path):
    """A run trained on review exports says which, beside the hash of the rows they added."""
    from types import SimpleNamespace

    import finetune_paligemma2 as flow
    from paligemma_json.run_record import run_settings
    splits = {split: SimpleNamespace(entries=[]) for split in ("train", "valid")}
    given = ["reviewed/corrections-review-001.jsonl", "downloads/"]
    settings = {**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path), "CORRECTIONS": given}
    assert run_settings(settings, None, splits, 8)["training"]["CORRECTIONS"] == given
    one = run_settings({**settings, "CORRECTIONS": "reviewed/corrections.jsonl"}, None, splits, 8)  # a notebook's string
    assert one["training"]["CORRECTIONS"] == ["reviewed/corrections.jsonl"]
