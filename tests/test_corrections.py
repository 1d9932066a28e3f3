"""CORRECTIONS: review pages' exports trained on with the train split: several files, or a folder of
them, a document in two files trained on once (the last read), the photos found in the folder the
export carries; a corrected photo that is also held out (valid or test) stops the run in one line,
whatever STRICT and DATASET_REPORT say."""

import json
import os
import shutil

import pytest

import finetune_paligemma2 as flow
from helpers import new_documents, run_script
from paligemma_json.corrections import add_corrections

PROMPT = "extract data in JSON format"


def write_export(folder, rows, name="corrections.jsonl") -> str:
    path = os.path.join(folder, name)
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
    """Through the script, two pages' exports: the dataset line counts them (the model path does not
    exist, so it stops right after, in one line)."""
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder, count=3)
    paths = [write_export(folder, rows[:2], "corrections-review-001.jsonl"),
             write_export(folder, rows[2:], "corrections-review-002.jsonl")]
    result = run_script("--dataset-dir", export, "--model-id", str(tmp_path / "no-model"), "--corrections", *paths,
                        "--output-dir", str(tmp_path / "out"))
    assert f"dataset: train 153 rows, valid 16 rows, test 24 rows (3 of train from {', '.join(paths)})" in result.stdout


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
    with pytest.raises(flow.FlowError, match=r"nowhere\.jsonl: no such file or folder; CORRECTIONS names review pages"):
        add_corrections(splits, str(tmp_path / "nowhere.jsonl"), PROMPT)
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder)
    os.remove(os.path.join(folder, "new-1.jpg"))
    with pytest.raises(flow.FlowError, match=r"corrections\.jsonl line 2 \(images are looked for in its folder, else "
                                             r"beside the file\): image .*new-1\.jpg is missing"):
        add_corrections(splits, write_export(folder, rows), PROMPT)


def test_several_exports_a_folder_and_a_document_corrected_twice(export, tmp_path, capsys):
    """Files in the order given, a folder's oldest first (by name, the browser's renamed second
    download would come first); a document in two files is trained on once, as the last file read has
    it, said in one line; a file named twice is read once."""
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder, count=3)
    again = {**rows[1], "suffix": rows[1]["suffix"].replace('"copy": "', '"copy": "X')}
    older = write_export(folder, rows[:2], "corrections-review-001.jsonl")
    newer = write_export(folder, [again, rows[2]], "corrections-review-001 (1).jsonl")  # a browser's second download
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    write_export(folder, [{"image": "not-read.jpg"}], "notes.jsonl")  # not an export's name: not read
    for setting, kept in [([older, newer], again), ([newer, older], rows[1]), ([folder], again), (folder, again),
                          ([folder, older], again)]:
        splits = flow.load_splits(export, PROMPT)
        before = len(splits["train"])
        assert add_corrections(splits, setting, PROMPT) == 3
        suffixes = {os.path.basename(entry["image"]): entry["suffix"] for entry in splits["train"].entries[before:]}
        assert suffixes["new-1.jpg"] == kept["suffix"], setting
        assert capsys.readouterr().out == ("corrections: 1 documents are in more than one file; each is trained on as "
                                           "the last file read has it (files in the order given, a folder's oldest first)\n")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(flow.FlowError, match=r"empty: no corrections\*\.jsonl in this folder"):
        add_corrections(splits, [str(tmp_path / "empty")], PROMPT)


def test_a_bad_line_in_the_second_file_is_named(export, tmp_path):
    folder = str(tmp_path / "reviewed")
    rows = new_documents(folder)
    first = write_export(folder, rows[:1], "corrections-review-001.jsonl")
    second = write_export(folder, rows[1:], "corrections-review-002.jsonl")
    with open(second, "a") as out:
        out.write('{"image": "new-0.jpg", "prefix": \n')
    with pytest.raises(flow.FlowError) as error:
        add_corrections(flow.load_splits(export, PROMPT), [first, second], PROMPT)
    assert str(error.value).startswith(f"{second} line 2: not valid JSON")


def test_an_export_saved_elsewhere_finds_its_photos_in_the_folder_it_carries(export, tmp_path):
    folder = str(tmp_path / "reviewed")
    rows = [{**row, "folder": folder} for row in new_documents(folder)]
    downloads = str(tmp_path / "downloads")
    os.makedirs(downloads)
    splits = flow.load_splits(export, PROMPT)
    assert add_corrections(splits, write_export(downloads, rows, "corrections-review.jsonl"), PROMPT) == 2
    assert [entry["image"] for entry in splits["train"].entries[-2:]] == [f"{folder}/new-0.jpg", f"{folder}/new-1.jpg"]
    assert set(splits["train"].entries[-1]) == {"image", "prefix", "suffix"}  # the folder is not a training key
    os.remove(f"{folder}/new-1.jpg")
    with pytest.raises(flow.FlowError, match=rf"line 2: image new-1.jpg is in neither {folder} \(where the review read "
                                             rf"it\) nor {downloads} \(beside the file\)"):
        add_corrections(splits, os.path.join(downloads, "corrections-review.jsonl"), PROMPT)
