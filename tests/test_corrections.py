"""CORRECTIONS: a review page's export trained on with the train split; a corrected photo that is also
held out (valid or test) stops the run in one line, whatever STRICT and DATASET_REPORT say."""

import json
import os
import shutil

import pytest

import finetune_paligemma2 as flow
from helpers import new_documents, run_script
from paligemma_json.corrections import add_corrections

PROMPT = "extract data in JSON format"


def write_export(folder, rows) -> str:
    path = os.path.join(folder, "corrections.jsonl")
    with open(path, "w") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def test_the_rows_join_the_train_split_with_their_images(export, tmp_path):
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder)
    splits = flow.load_splits(export, PROMPT)
    before = len(splits["train"])
    assert add_corrections(splits, write_export(folder, rows), PROMPT) == 2
    assert len(splits["train"]) == before + 2
    image, entry = splits["train"][before + 1]
    assert entry["suffix"] == rows[1]["suffix"] and image.size == flow.Image.open(f"{folder}/new-1.jpg").size
    assert len(splits["valid"]) == 16 and len(splits["test"]) == 24  # held out as they were


def test_the_rows_train_on_the_runs_prompt_not_the_exports(export, tmp_path):
    """A run whose PROMPT changed since the review trains the corrected rows on the new prompt, as its
    own split's rows (the export keeps the prompt the page was made with)."""
    folder = str(tmp_path / "reviewed")
    rows = [{**row, "prefix": "the export's old prompt"} for row in new_documents(folder)]
    splits = flow.load_splits(export, PROMPT)
    add_corrections(splits, write_export(folder, rows), PROMPT)
    assert [entry["prefix"] for entry in splits["train"].entries[-2:]] == [PROMPT, PROMPT]
    assert splits["train"].entries[0]["prefix"] == PROMPT


def test_the_next_run_reads_the_exported_rows(export, tmp_path):
    """Through the script: the dataset line counts them (the model path does not exist, so it stops
    right after, in one line)."""
    folder = str(tmp_path / "reviewed")
    path = write_export(folder, new_documents(folder))
    result = run_script("--dataset-dir", export, "--model-id", str(tmp_path / "no-model"), "--corrections", path,
                        "--output-dir", str(tmp_path / "out"))
    assert f"dataset: train 152 rows, valid 16 rows, test 24 rows (2 of train from {path})" in result.stdout


@pytest.mark.parametrize("split", ["test", "valid"])
def test_a_corrected_photo_that_is_held_out_stops_the_run_in_one_line(export, tmp_path, split):
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder)
    held_out = json.loads(open(os.path.join(export, split, "annotations.jsonl")).readline())
    shutil.copy(os.path.join(export, split, held_out["image"]), os.path.join(folder, "looks-new.jpg"))
    rows.append({"image": "looks-new.jpg", "prefix": PROMPT, "suffix": held_out["suffix"]})
    path = write_export(folder, rows)
    result = run_script("--dataset-dir", export, "--model-id", str(tmp_path / "no-model"), "--corrections", path,
                        "--output-dir", str(tmp_path / "out"), "--no-dataset-report")  # stops whatever it says
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {path} line 3: this corrected photo is also {split}'s {held_out['image']}"
                                     ", which would then score the model on what it trained on; remove the line (or "
                                     f"the photo from {split})")
    assert "model:" not in result.stdout


def test_a_missing_export_or_image_is_named(export, tmp_path):
    splits = flow.load_splits(export, PROMPT)
    with pytest.raises(flow.FlowError, match="no such file; CORRECTIONS names the corrections.jsonl"):
        add_corrections(splits, str(tmp_path / "nowhere.jsonl"), PROMPT)
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder)
    os.remove(os.path.join(folder, "new-1.jpg"))
    with pytest.raises(flow.FlowError, match=r"corrections\.jsonl line 2 \(images are looked for beside the file\)"):
        add_corrections(splits, write_export(folder, rows), PROMPT)
