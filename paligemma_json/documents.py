"""What the flow reads: a Roboflow split's rows and images, each checked before any model loads,
and new documents for `--predict`, both in the one shape every dataset of the flow has (`DocumentDataset`)."""

import os
from typing import Protocol

from PIL import Image
from torch.utils.data import Dataset

from paligemma_json import FlowError
from paligemma_json.json_text import jsonl_rows, parse_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
PREDICT_KEYS = ("image", "image_path", "prefix", "prediction", "truncated", "confidence")  # no label to keep


class DocumentDataset(Protocol):
    """The shape of every dataset the flow trains, predicts or reports on (the script's `JSONLDataset`,
    `DocumentImages` below, distributed.py's `DatasetShare`), and all it reads of one:
    `dataset[i] -> (image, entry)`, an RGB image and its row."""

    entries: list[dict]  # `{"image", "prefix", "suffix"}` rows, in order (a split's: each an `Entry`)
    image_directory_path: str  # where each row's image is (an absolute `image` is found as it is)

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> tuple[Image.Image, dict]: ...


class Entry(dict):
    """A split's row, `{"image", "prefix", "suffix"}`: its keys are all that a prediction row,
    run_settings.json or a hash takes from it. What loading learned rides beside them as attributes,
    never as keys, so nothing written from a row carries it: `label`, the suffix parsed once (None
    when it is not a JSON object or array), and the image's `image_size` and `image_mode` as its
    header gives them, for the dataset report, and `where` it was read ("PATH line N"), for messages
    about its label. Pixels are decoded per batch, never kept: thousands of photos do not fit in memory."""

    def __init__(self, row: dict, image_size: tuple[int, int], image_mode: str, where: str = ""):
        super().__init__(row)
        self.label = parse_json(self["suffix"])
        self.image_size, self.image_mode, self.where = image_size, image_mode, where


def check_image(path: str, where: str) -> tuple[tuple[int, int], str]:
    """Decodes the whole file (JPEGs at 1/8 scale, which is fast) so truncation is caught now; its
    (width, height) and mode, as the header gives them."""
    if not os.path.isfile(path):
        raise FlowError(f"{where}: image {path} is missing; restore it or remove the row")
    if os.path.getsize(path) == 0:
        raise FlowError(f"{where}: image {path} is empty; re-export it or remove the row")
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode  # before `draft` shrinks them
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:
        raise FlowError(f"{where}: image {path} cannot be read ({error}); re-export it or remove the row") from None
    return size, mode


def read_annotations(jsonl_path: str, image_dir: str, prompt: str = "") -> list[Entry]:
    """A split's `{"image", "prefix", "suffix"}` rows, each checked with its image; `prompt`, when
    given, replaces every row's prefix."""
    if not os.path.isfile(jsonl_path):
        raise FlowError(f"{jsonl_path}: missing; each split needs its annotations.jsonl")
    entries = []
    for where, row in jsonl_rows(jsonl_path, "fix or remove the line"):
        image = check_row(row, image_dir, where)
        entries.append(Entry({**row, "prefix": prompt or row["prefix"]}, *image, where))
    if not entries:
        raise FlowError(f"{jsonl_path}: no rows; the split must hold at least one labelled image")
    return entries


def check_row(row, image_dir: str, where: str) -> tuple[tuple[int, int], str]:
    """The row's keys, then its image (`check_image`, whose size and mode it returns)."""
    if not isinstance(row, dict):
        raise FlowError(f"{where}: expected an object with image, prefix and suffix")
    for key in ("image", "prefix", "suffix"):
        if not isinstance(row.get(key), str):
            problem = "missing" if key not in row else f"not a string ({type(row[key]).__name__})"
            raise FlowError(f"{where}: '{key}' is {problem}; every row needs string image, prefix and suffix")
    return check_image(os.path.join(image_dir, row["image"]), where)


class DocumentImages(Dataset, DocumentDataset):
    """New documents: an image file, or every image in a folder (in name order), each with the prompt and
    no label. Listed, not read: `--predict` reads each image with its batch, and one that cannot be read
    becomes a row marked unreadable, not a stop (paligemma_json/predict.py)."""

    def __init__(self, path: str, prompt: str):
        if os.path.isdir(path):
            self.image_directory_path = path
            names = sorted(name for name in os.listdir(path) if name.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            self.image_directory_path, names = os.path.dirname(path) or ".", [os.path.basename(path)]
        else:
            raise FlowError(f"{path}: no such image or folder; pass --predict an image or a folder of images")
        if not names:
            raise FlowError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        if not prompt:
            raise FlowError("--predict needs the prompt the model was trained with: pass --prompt")
        self.entries = [{"image": name, "prefix": prompt, "suffix": ""} for name in names]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int):
        entry = self.entries[idx]
        return Image.open(os.path.join(self.image_directory_path, entry["image"])).convert("RGB"), entry


def document_row(row: dict) -> dict:
    """A `--predict` row: the prediction row's keys but the (empty) label, whether it parses, and where
    the photo is one the trained run held out, which (`held_out`)."""
    return {**{key: row[key] for key in PREDICT_KEYS}, "parsed": parse_json(row["prediction"]) is not None,
            **({"held_out": row["held_out"]} if row.get("held_out") else {})}  # a photo the run held out
