"""CORRECTIONS: the rows review pages exported (`review.html` and its pages, written by `--predict`),
trained on with the export's training split. Each page exports its own Roboflow-style
`{"image", "prefix", "suffix"}` JSONL, plus `folder`, where the page read the images, so the dataset
folder stays as Roboflow exported it and a run's inputs say what it trained on. A corrected photo must
never be scored: one that is also in the validation or test split stops the run, whatever STRICT and
DATASET_REPORT say.

CORRECTIONS is a list of files and folders, read in the order given; a folder stands for every
`corrections*.jsonl` in it, oldest first (a browser's renamed second download, `... (1).jsonl`, is
then read after the first). A document (an image, by its full path) in several files is trained on
once, as the last file read has it, said in one line."""

import glob
import os

from paligemma_json import FlowError
from paligemma_json.dataset_report import cross_split_leaks
from paligemma_json.documents import Entry, check_row
from paligemma_json.json_text import jsonl_rows
from paligemma_json.plan import corrections_paths  # a notebook's one path as a string, or a list

PATTERN = "corrections*.jsonl"  # what a review page's export is named: corrections-review-002.jsonl


def correction_files(setting) -> list[str]:
    """Every file the setting names, a folder's `corrections*.jsonl` oldest first, each once."""
    files = []
    for path in corrections_paths(setting):
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), PATTERN)),
                           key=lambda name: (os.path.getmtime(name), name))
            if not found:
                raise FlowError(f"{path}: no {PATTERN} in this folder; save the review pages' exports there, or "
                                "name the files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FlowError(f"{path}: no such file or folder; CORRECTIONS names review pages' exports "
                            f"({PATTERN}) or a folder of them")
    unique = {}  # a file named twice (itself and its folder) is read once, at its first place
    for path in files:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def image_folder(row, beside: str, where: str) -> str:
    """Where the row's image is: the folder the export carries, where the page read it; else beside
    the file (the photos moved, and the export with them)."""
    carried = row.get("folder") if isinstance(row, dict) else None
    if isinstance(carried, str) and isinstance(row.get("image"), str) and \
            os.path.isfile(os.path.join(carried, row["image"])):
        return carried
    if isinstance(carried, str) and not os.path.isfile(os.path.join(beside, str(row.get("image")))):
        raise FlowError(f"{where}: image {row.get('image')} is in neither {carried} (where the review read it) "
                        f"nor {beside} (beside the file); restore it or remove the line")
    return beside


class Corrections:
    """The exports' rows, each image named by its full path (the training split's are relative to
    its own folder), and where each came from (`file line N`)."""

    def __init__(self, setting, prompt: str = ""):
        rows = {}  # full image path -> (entry, where): a later file's row replaces an earlier one
        self.replaced = 0
        for path in correction_files(setting):
            beside, lines = os.path.dirname(os.path.abspath(path)), 0
            for where, row in jsonl_rows(path, "fix or remove the line"):
                lines += 1
                folder = image_folder(row, beside, where)
                image = check_row(row, folder, f"{where} (images are looked for in its folder, else beside the file)")
                full = os.path.abspath(os.path.join(folder, row["image"]))
                self.replaced += rows.pop(full, None) is not None
                rows[full] = (Entry({"image": full, "prefix": prompt or row["prefix"], "suffix": row["suffix"]},
                                    *image, where), where)
            if not lines:
                raise FlowError(f"{path}: no rows; mark documents reviewed on the review page before exporting")
        self.entries = [entry for entry, _ in rows.values()]
        self.where = [where for _, where in rows.values()]


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


def add_corrections(splits: dict, setting, prompt: str) -> int:
    """Appends the exports' rows to the training split, once none of their photos is held out; how many."""
    corrections = Corrections(setting, prompt)
    refuse_scored_photos(corrections, splits)
    if corrections.replaced:
        print(f"corrections: {corrections.replaced} documents are in more than one file; each is trained on as "
              "the last file read has it (files in the order given, a folder's oldest first)")
    splits["train"].entries.extend(corrections.entries)  # absolute image paths: os.path.join keeps them
    return len(corrections.entries)
