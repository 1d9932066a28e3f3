"""CORRECTIONS: the rows a review page exported (`review.html`, written by `--predict`), trained on
with the export's training split. The export is a Roboflow-style `{"image", "prefix", "suffix"}` JSONL
saved beside the images it names, so the dataset folder stays as Roboflow exported it and a run's
inputs say what it trained on. A corrected photo must never be scored: one that is also in the
validation or test split stops the run, whatever STRICT and DATASET_REPORT say."""

import os

from paligemma_json import FlowError
from paligemma_json.dataset_report import cross_split_leaks
from paligemma_json.documents import Entry, check_row
from paligemma_json.json_text import jsonl_rows


class Corrections:
    """The export's rows, each image named by its full path (the training split's are relative to
    its own folder), and where each came from (`file line N`)."""

    def __init__(self, path: str, prompt: str = ""):
        if not os.path.isfile(path):
            raise FlowError(f"{path}: no such file; CORRECTIONS names the corrections.jsonl a review page exported, "
                            "saved beside the images it names")
        folder = os.path.dirname(os.path.abspath(path))
        self.entries, self.where = [], []
        for where, row in jsonl_rows(path, "fix or remove the line"):
            image = check_row(row, folder, f"{where} (images are looked for beside the file)")
            self.entries.append(Entry({**row, "image": os.path.join(folder, row["image"]),
                                       "prefix": prompt or row["prefix"]}, *image, where))
            self.where.append(where)
        if not self.entries:
            raise FlowError(f"{path}: no rows; mark documents reviewed on the review page before exporting")


def refuse_scored_photos(corrections: Corrections, splits: dict) -> None:
    """The first corrected photo that is also a validation or test photo stops the run in one line."""
    held_out = {split: splits[split] for split in ("valid", "test")}
    paths = {split: [os.path.join(data.image_directory_path, entry["image"]) for entry in data.entries]
             for split, data in held_out.items()}
    paths["corrections"] = [entry["image"] for entry in corrections.entries]
    for pair in cross_split_leaks({"corrections": corrections, **held_out}, paths)["same_photo"]:
        if "corrections" in pair:
            split = "valid" if "valid" in pair else "test"
            line = corrections.where[[entry["image"] for entry in corrections.entries].index(pair["corrections"])]
            raise FlowError(f"{line}: this corrected photo is also {split}'s {pair[split]}, which would then score "
                            f"the model on what it trained on; remove the line (or the photo from {split})")


def add_corrections(splits: dict, path: str, prompt: str) -> int:
    """Appends the export's rows to the training split, once none of its photos is held out; how many."""
    corrections = Corrections(path, prompt)
    refuse_scored_photos(corrections, splits)
    splits["train"].entries.extend(corrections.entries)  # absolute image paths: os.path.join keeps them
    return len(corrections.entries)
