"""Look at the data before training: sizes, label lengths against the generation budget, how often
each field is filled, and leaks between splits (the same photo, or the same label, in two splits)."""

import itertools
import os
import statistics
from dataclasses import dataclass

from paligemma_json import FlowError
from paligemma_json.files import read_saved_json, write_json_atomically
from paligemma_json.json_text import json_type, key_paths
from paligemma_json.plan import RunPlan
from paligemma_json.run_record import check_run_settings
from paligemma_json.schema import save_label_schema

HASH_SIZE = 16  # a 256-bit perceptual hash: 8×8 (64 bits) saw distinct demo manifests as equal
# Measured by benchmarks/leak_thresholds.py on the demo's near-identical manifests: re-encoded or
# resized copies within 12 bits and correlating ≥ 0.9990; distinct ones ≥ 16 bits apart, ≤ 0.9827.
CANDIDATE_BITS = 24
SAME_PHOTO_CORRELATION = 0.995  # on 64×64 grey pixels, normalized


def spread(values: list) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _is_field(value) -> bool:
    """Where a label's walk stops: a scalar, and also an empty object or list, or a list that is not
    of objects, each one field (unlike the metrics, which score a list's values one by one)."""
    objects = isinstance(value, list) and value and all(isinstance(item, dict) for item in value)
    return not (objects or (isinstance(value, dict) and value))


def field_paths(value) -> dict:
    """Key path → (filled, JSON types) for one label, with the metrics' key paths; filled means a
    value other than null, "", [] or {}."""
    found = {}
    for path, field in key_paths(value, is_leaf=_is_field):
        if path:
            filled, types = found.get(path, (False, set()))
            found[path] = (filled or field not in (None, "", [], {}), types | {json_type(field)})
    return found


def image_summary(entries: list) -> dict:
    """Sizes and modes as loading's image check read them (documents.Entry): no file opened again."""
    sizes, modes = [entry.image_size for entry in entries], {}
    for entry in entries:
        modes[entry.image_mode] = modes.get(entry.image_mode, 0) + 1
    return {"width": spread([w for w, _ in sizes]), "height": spread([h for _, h in sizes]), "modes": modes}


def fingerprints(paths: list[str]) -> list:
    """(perceptual hash, normalized 64×64 grey pixels) per image. Each image is opened again: the
    hash needs grey pixels at about 256 px, where the load's check decoded at 1/8 scale, and only the
    report and the corrections' check need them, which keeping them from the load would hold in
    memory (16 KB an image) for the whole run."""
    import imagehash
    import numpy as np
    from PIL import Image
    prints = []
    for path in paths:
        with Image.open(path) as image:
            image.draft("L", (256, 256))  # JPEGs decode at a fraction of their size: fast
            grey = image.convert("L")
        pixels = np.asarray(grey.resize((64, 64), Image.BILINEAR), dtype=np.float32)
        prints.append((imagehash.phash(grey, hash_size=HASH_SIZE), (pixels - pixels.mean()) / (pixels.std() + 1e-6)))
    return prints


HELD_OUT_NAME = "held_out.json"  # in OUTPUT_DIR, never final/: --push-to-hub uploads final/
HELD_OUT_BITS = 12  # a re-encoded or resized copy measured within 12 bits; distinct manifests 16 or more apart


def save_held_out(splits: dict, output_dir: str) -> None:
    """The validation and test photos' perceptual hashes (hashes alone, no pixels), by which --predict
    marks a document that is one of them: the review page then says its correction would be refused."""
    records = []
    for split in ("valid", "test"):
        data = splits[split]
        paths = [os.path.join(data.image_directory_path, entry["image"]) for entry in data.entries]
        for entry, (photo_hash, _) in zip(data.entries, fingerprints(paths)):
            records.append({"split": split, "image": entry["image"], "hash": str(photo_hash)})
    write_json_atomically(records, os.path.join(output_dir, HELD_OUT_NAME))


def held_out_marker(output_dir: str):
    """`mark(rows)`: each --predict row whose photo is one the trained run held out gets `held_out`
    ("test's IMG_0014…"), by its perceptual hash alone (the run's pixels are not kept); no record, no marks."""
    import imagehash
    records = read_saved_json(os.path.join(output_dir, HELD_OUT_NAME)) or []
    known = [(imagehash.hex_to_hash(record["hash"]), f"{record['split']}'s {record['image']}") for record in records]

    def mark(rows) -> list[dict]:
        rows = list(rows)  # predict_rows yields them
        if not known:
            return rows
        for row, (photo_hash, _) in zip(rows, fingerprints([row["image_path"] for row in rows])):
            distance, name = min((photo_hash - held, name) for held, name in known)
            if distance <= HELD_OUT_BITS:
                row["held_out"] = name
        return rows
    return mark


def cross_split_leaks(splits: dict, paths: dict) -> dict:
    """Pairs across splits that are the same photo, or carry the same label. A photo pair is a
    perceptual-hash match confirmed by pixel correlation: similar forms on similar tables can hash
    alike, a re-encoded or resized copy also correlates almost perfectly."""
    prints = {split: fingerprints(paths[split]) for split in splits}
    photos, labels = [], []
    for first, second in itertools.combinations(splits, 2):
        for (i, (hash_a, pixels_a)), (j, (hash_b, pixels_b)) in itertools.product(
                enumerate(prints[first]), enumerate(prints[second])):
            if hash_a - hash_b <= CANDIDATE_BITS:
                correlation = float((pixels_a * pixels_b).mean())
                if correlation >= SAME_PHOTO_CORRELATION:
                    photos.append({first: splits[first].entries[i]["image"], second: splits[second].entries[j]["image"],
                                   "hash_distance": int(hash_a - hash_b), "correlation": round(correlation, 4)})
        seen = {}
        for entry in splits[first].entries:
            seen.setdefault(entry["suffix"], entry["image"])
        for entry in splits[second].entries:
            if entry["suffix"] in seen:
                labels.append({first: seen[entry["suffix"]], second: entry["image"]})
    return {"same_photo": photos, "same_label": labels}


def label_lengths(dataset, tokenizer) -> list[int]:
    """Each label's length in the model's tokens, with the EOS that ends it."""
    return [len(tokenizer(entry["suffix"])["input_ids"]) + 1 for entry in dataset.entries]


def label_tokens(splits: dict, tokenizer) -> dict[str, list[int]]:
    """Split name → its `label_lengths`: tokenized once, for the budget, the report and the MFU."""
    return {split: label_lengths(data, tokenizer) for split, data in splits.items()}


def token_budget(lengths: list[int]) -> int:
    """A generation budget that fits every label seen, with room for a longer document."""
    longest = max(lengths)
    return longest + max(16, longest // 4)


def build_dataset_report(splits: dict, lengths: dict[str, list[int]], max_new_tokens: int) -> dict:
    """`splits`: name → a loaded split (documents.DocumentDataset, its entries `Entry`s); `lengths`:
    their `label_tokens`."""
    paths = {split: [os.path.join(data.image_directory_path, e["image"]) for e in data.entries]
             for split, data in splits.items()}
    report = {"rows": {split: len(data) for split, data in splits.items()}, "images": {}, "label_tokens": {},
              "max_new_tokens": max_new_tokens}
    for split in splits:
        report["images"][split] = image_summary(splits[split].entries)
        report["label_tokens"][split] = spread(lengths[split])
    every = [(n, f"{split}/{entry['image']}") for split, data in splits.items()
             for n, entry in zip(lengths[split], data.entries)]
    longest, longest_image = max(every)
    report["labels_over_budget"] = {"count": sum(n > max_new_tokens for n, _ in every), "longest": longest,
                                    "longest_image": longest_image}

    fields, json_rows = {}, 0
    for data in splits.values():
        for entry in data.entries:
            if entry.label is None:  # parsed once, when loaded
                continue
            json_rows += 1
            for path, (filled, types) in field_paths(entry.label).items():
                count, seen = fields.get(path, (0, set()))
                fields[path] = (count + filled, seen | types)
    report["json_rows"] = json_rows
    report["labels_left_out"] = {split: getattr(data, "left_out", []) for split, data in splits.items()}
    report["fields"] = {path: {"filled": count / json_rows, "types": sorted(types)}
                        for path, (count, types) in sorted(fields.items(), key=lambda item: item[1][0])}
    report["leaks"] = cross_split_leaks(splits, paths)
    return report


def format_dataset_report(report: dict) -> str:
    lines = [f"{'split':<8}{'rows':>6}{'width min/med/max':>22}{'height min/med/max':>22}{'label tokens min/med/max':>28}"]
    for split, rows in report["rows"].items():
        width, height, tokens = (report["images"][split]["width"], report["images"][split]["height"],
                                 report["label_tokens"][split])
        lines.append(f"{split:<8}{rows:>6}{'/'.join(f'{v:g}' for v in width.values()):>22}"
                     f"{'/'.join(f'{v:g}' for v in height.values()):>22}{'/'.join(f'{v:g}' for v in tokens.values()):>28}")
    sparse = [(path, field["filled"]) for path, field in report["fields"].items() if field["filled"] < 1]
    if sparse:
        lines.append("fields not always filled: " + ", ".join(f"{path} {share:.0%}" for path, share in sparse[:8]))
    return "\n".join(lines)


def dataset_warnings(report: dict) -> list[str]:
    warnings = []
    over = report["labels_over_budget"]
    if over["count"]:
        warnings.append(f"{over['count']} labels are longer than MAX_NEW_TOKENS={report['max_new_tokens']} tokens "
                        f"(the longest, {over['longest_image']}, has {over['longest']}): their predictions will be "
                        "cut off; raise --max-new-tokens")
    for kind, what in (("same_photo", "the same photo"), ("same_label", "the same label")):
        for pair in report["leaks"][kind]:
            sides = " and ".join(f"{split}/{name}" for split, name in pair.items()
                                 if split not in ("hash_distance", "correlation"))
            warnings.append(f"leak: {what} in {sides}; the test score will flatter the model")
    return warnings


def report_dataset(splits: dict, lengths: dict[str, list[int]], max_new_tokens: int, output_dir: str,
                   strict: bool) -> dict:
    """Prints the report and its warnings, saves `dataset_report.json`; with `strict`, a leak stops the run."""
    report = build_dataset_report(splits, lengths, max_new_tokens)
    write_json_atomically(report, os.path.join(output_dir, "dataset_report.json"))
    print(format_dataset_report(report))
    for warning in dataset_warnings(report):
        print(f"warning: {warning}")
    leaks = len(report["leaks"]["same_photo"]) + len(report["leaks"]["same_label"])
    if strict and leaks:
        raise FlowError(f"{leaks} leaks between splits (listed above and in "
                        f"{os.path.join(output_dir, 'dataset_report.json')}); remove them, or drop --strict")
    return report


@dataclass(frozen=True)
class CheckedData:
    label_tokens: dict[str, list[int]]  # per split: each label's length in tokens, with EOS
    max_new_tokens: int  # MAX_NEW_TOKENS, or when it is 0 the budget sized from the labels
    settings: dict  # the run's settings with that budget in: what run_settings.json and the model card record


def check_data(splits: dict, tokenizer, settings: dict, run: RunPlan, schema: dict | None) -> CheckedData:
    """Step 4's checks of the data, which need the tokenizer and come before the model loads: the labels
    in tokens and the generation budget sized from them; a --resume that would mix two runs' settings
    refused; then, by the writing process, the labels' schema and the run's settings saved and the dataset
    report printed and saved (with STRICT, a leak stops the run)."""
    lengths = label_tokens(splits, tokenizer)
    max_new_tokens = settings["MAX_NEW_TOKENS"]
    if max_new_tokens <= 0:
        max_new_tokens = token_budget(lengths["train"] + lengths["valid"])
        print(f"MAX_NEW_TOKENS={max_new_tokens}: the longest train/valid label in tokens, + 25%")
    as_run = {**settings, "MAX_NEW_TOKENS": max_new_tokens}
    check_run_settings(as_run, run, schema, splits)  # then OUTPUT_DIR/run_settings.json
    if run.writes:
        save_label_schema(schema, run.output_dir)
        save_held_out(splits, run.output_dir)  # so --predict can say which documents were held out
        if settings["DATASET_REPORT"]:
            report_dataset(splits, lengths, max_new_tokens, run.output_dir, settings["STRICT"])
    return CheckedData(lengths, max_new_tokens, as_run)
