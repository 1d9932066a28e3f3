"""Result files are replaced whole: a write that fails half-way leaves the earlier file as it was,
for every writer of a result file. And what a cut-off prediction run keeps."""

import builtins
import errno
import io
import json
import os

import pytest
import torch

import finetune_paligemma2 as flow
from paligemma_json.dataset_report import label_tokens, report_dataset
from paligemma_json.evaluation import evaluate_predictions
from paligemma_json.files import completed_rows, replace_atomically, write_json_atomically
from paligemma_json.pictures import draw_training_curves

PROMPT = "extract data in JSON format"


class HalfWrittenFile:
    """A file that takes half of the first write it is given, then fails as a full disk does."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[:max(1, len(data) // 2)])
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device (simulated half-way through a write)")

    def writelines(self, lines):
        self.write("".join(lines))

    def fileno(self):
        raise io.UnsupportedOperation("fileno")  # or PIL writes past us, through the descriptor

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def fail_writes_under(monkeypatch, target):
    """From now on, every file opened for writing whose path starts with `target` (the result
    itself, or a temporary name beside it, or a file inside it) fails half-way."""
    real_open = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if (isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+")
                and os.path.abspath(file).startswith(str(target))):
            return HalfWrittenFile(handle)
        return handle
    monkeypatch.setattr(builtins, "open", opening)


def snapshot(path):
    """Every byte of a file, or of every file under a folder."""
    if os.path.isfile(path):
        return open(path, "rb").read()
    return {os.path.relpath(os.path.join(root, name), path): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(path) for name in names}


@pytest.fixture(scope="module")
def splits(small_export):
    return flow.load_splits(small_export, PROMPT)


def prediction_rows(splits, prediction):
    return [{"image": entry["image"], "image_path": os.path.join(splits["test"].image_directory_path, entry["image"]),
             "prefix": PROMPT, "suffix": entry["suffix"], "prediction": prediction(entry["suffix"]), "truncated": False}
            for entry in splits["test"].entries[:3]]


def moved(model):
    """The same architecture with different weights: what a later run would save."""
    other = type(model)(model.config)
    other.load_state_dict({name: tensor + 0.01 for name, tensor in model.state_dict().items()})
    return other.eval()


def writers(untrained, splits, demo_assets, tmp_path):
    """name -> (the result's path, write(generation)): generation 0 is the earlier result, 1 a newer one."""
    model, processor = untrained
    schema = flow.label_schema(splits)
    rows = [prediction_rows(splits, lambda suffix: suffix), prediction_rows(splits, lambda suffix: suffix[:30])]
    log = [[{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5, "eval_field_f1": 0.2}],
           [{"step": 1, "loss": 3.0}, {"step": 4, "eval_loss": 0.5, "eval_field_f1": 0.9}]]
    run = tmp_path / "run"
    run.mkdir()

    def trained(generation):  # a finished run's final/, the full model or a LoRA adapter
        final = run / "final"
        if not final.exists():
            flow.save_final_model(model, processor, str(final), schema)
        return str(run)

    def lora_run(generation):  # a LoRA run's final/: its adapter zero at first, moved later
        adapted = flow.load_model(demo_assets[1], True, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
        with torch.no_grad():
            for name, parameter in adapted.named_parameters():
                parameter.add_(0.01 * generation if "lora_B" in name else 0)
        flow.save_final_model(adapted, processor, str(tmp_path / "lora" / "final"), schema)
        return str(tmp_path / "lora")

    def predictions(generation):  # rows of a cut-off test-set run, then its --resume
        path = run / "predictions.jsonl"
        if generation == 0:
            path.write_text("".join(json.dumps(row) + "\n" for row in rows[0][:2]))
        else:
            flow.predict_to_file(model, processor, splits["test"], str(path),
                                 flow.GenerationSettings(torch.float32, max_new_tokens=2, batch_size=2), resume=True)
    images, lengths = splits["test"].image_directory_path, label_tokens(splits, processor.tokenizer)
    return {
        "metrics.json": (run / "metrics.json", lambda g: evaluate_predictions(rows[g], str(run))),
        "predictions.png": (run / "predictions.png", lambda g: evaluate_predictions(rows[g], str(run))),
        "report.html": (run / "report.html", lambda g: evaluate_predictions(rows[g], str(run))),
        "schema.json": (run / "schema.json", lambda g: write_json_atomically([schema, {"type": "object"}][g],
                                                                             str(run / "schema.json"))),
        "dataset_report.json": (run / "dataset_report.json",
                                lambda g: report_dataset(splits, lengths, [400, 20][g], str(run), False)),
        "training_curves.png": (run / "training_curves.png",
                                lambda g: draw_training_curves(log[g], str(run / "training_curves.png"), g + 1)),
        "final": (run / "final", lambda g: flow.save_final_model([model, moved(model)][g], processor,
                                                                 str(run / "final"), [schema, None][g])),
        "predictions.jsonl": (run / "predictions.jsonl", predictions),
        "predict.jsonl": (run / "predict.jsonl", lambda g: flow.predict_documents(
            trained(g), [images, os.path.join(images, splits["test"].entries[0]["image"])][g], PROMPT,
            flow.GenerationSettings(torch.float32, max_new_tokens=4, batch_size=2), constrained=False, threshold=0.8)),
        "merged": (tmp_path / "lora" / "merged", lambda g: flow.merge_adapter(lora_run(g))),
    }


RESULTS = ["metrics.json", "predictions.png", "report.html", "schema.json", "dataset_report.json",
           "training_curves.png", "final", "predictions.jsonl", "predict.jsonl", "merged"]


@pytest.mark.parametrize("result", RESULTS)
def test_a_write_that_fails_half_way_leaves_the_earlier_result_whole(result, untrained, splits, demo_assets, tmp_path,
                                                                      monkeypatch):
    path, write = writers(untrained, splits, demo_assets, tmp_path)[result]
    write(0)
    earlier = snapshot(path)
    assert earlier, "the writer wrote nothing to fail over"
    fail_writes_under(monkeypatch, path)
    with pytest.raises(OSError, match="simulated half-way"):
        write(1)
    assert snapshot(path) == earlier
    monkeypatch.undo()
    write(1)  # the same write, on a disk with room, does replace it
    assert snapshot(path) != earlier
    assert not os.path.exists(str(path) + ".tmp")


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "final"
    (final / "old").mkdir(parents=True)

    def write(temporary):
        os.makedirs(temporary)
        open(os.path.join(temporary, "model.safetensors"), "w").write("new")
    replace_atomically(write, str(final))
    assert sorted(os.listdir(final)) == ["model.safetensors"] and not (tmp_path / "final.tmp").exists()


ENTRIES = [{"image": f"IMG_{n}.jpg"} for n in range(4)]


def row_line(image, newline=True):
    return json.dumps({"image": image, "prediction": "{}"}) + ("\n" if newline else "")


def test_completed_rows_stop_at_a_last_line_without_its_newline(tmp_path):
    """The crash came between the row and its newline: the row parses, but it was never finished."""
    path = tmp_path / "predictions.jsonl"
    path.write_text(row_line("IMG_0.jpg") + row_line("IMG_1.jpg") + row_line("IMG_2.jpg", newline=False))
    assert [row["image"] for row in completed_rows(str(path), ENTRIES)] == ["IMG_0.jpg", "IMG_1.jpg"]


def test_completed_rows_stop_at_a_row_for_another_image(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(row_line("IMG_0.jpg") + row_line("IMG_9.jpg") + row_line("IMG_2.jpg"))
    assert [row["image"] for row in completed_rows(str(path), ENTRIES)] == ["IMG_0.jpg"]


def test_completed_rows_ignore_rows_past_the_end_of_the_split(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(row_line(f"IMG_{n}.jpg") for n in range(6)))
    assert [row["image"] for row in completed_rows(str(path), ENTRIES[:3])] == ["IMG_0.jpg", "IMG_1.jpg", "IMG_2.jpg"]


def test_completed_rows_of_a_missing_or_torn_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    assert completed_rows(str(path), ENTRIES) == []
    path.write_text(row_line("IMG_0.jpg") + row_line("IMG_1.jpg")[:25])
    assert [row["image"] for row in completed_rows(str(path), ENTRIES)] == ["IMG_0.jpg"]
