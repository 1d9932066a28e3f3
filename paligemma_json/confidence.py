"""Confidence per field, what it says over a set of scored rows, and the threshold below which a field
is sent for a check by hand.

A field's confidence is the lowest probability among the tokens that wrote its value
(`field_confidences`, from the probabilities `constrained.ChosenTokenProbabilities` records). Over
scored rows (metrics.py's `ScoredRow`): how well it ranks right fields above wrong ones
(`confidence_auroc`), matches their accuracy (`confidence_ece`), and what a threshold flags
(`confidence_figures`, `field_flags`).

`CONFIDENCE_THRESHOLD = 0` asks for it to be picked on the validation split, decoded once after
training exactly as the test set is. There a temperature is fitted first (temperature scaling of
the logit of each field's raw confidence: benchmarks/calibration.py measured it to lower the test
set's calibration error on three demo seeds, and as a monotone map it changes no ranking and no
flag), then the threshold is the smallest whose flags catch `FLAG_WRONG_SHARE` of the wrong
validation fields, on the calibrated confidences. Both are saved as `final/confidence.json`, beside
the model; the test set and `--predict` calibrate with that temperature. `--evaluate FILE` reads
`confidence.json` beside FILE, else `final/confidence.json` there (a run's directory). Any other
setting is used as given, on the confidences as the run wrote them.
"""

import bisect
import json
import math
import os
import re
from json.decoder import scanstring
from typing import TYPE_CHECKING

from paligemma_json import FlowError
from paligemma_json.files import read_saved_json, write_json_atomically
from paligemma_json.json_text import child_path, parse_json

if TYPE_CHECKING:  # metrics imports this module: its row type, for the annotations alone
    from paligemma_json.metrics import ScoredRow

FALLBACK_THRESHOLD = 0.8  # the threshold when none is given, picked or saved


def shown(threshold: float) -> str:
    """A threshold as printed and drawn: 4 significant digits (a picked one is the float just above a
    wrong field's confidence, 0.13980783571249336). The flags compare the unrounded value."""
    return f"{threshold:.4g}"
MINIMUM_WRONG_FIELDS = 5  # fewer wrong validation fields than this say nothing about a share of them
RECORD_NAME = "confidence.json"
VALIDATION_PREDICTIONS = "validation_predictions.jsonl"  # in OUTPUT_DIR, beside predictions.jsonl
CLIP = 1e-5  # confidences are clipped to [CLIP, 1 - CLIP] before their logit is taken


# --- Each field's confidence, from the tokens that wrote it --------------------------------------

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}


def json_pointer(parent: str, step) -> str:
    """RFC 6901: `/products/2/cases` is the third line item's cases, where the key path says `products.cases`."""
    return f"{parent}/{str(step).replace('~', '~0').replace('/', '~1')}"


def leaf_spans(text: str) -> list[tuple[str, object, int, int, str]]:
    """(key path, value, start, end, JSON pointer) for every scalar in a JSON text, in order, with the
    key paths of `json_text.key_paths` (list items share their list's; the pointer says which item).
    [] when the text is not JSON."""
    leaves = []

    def skip(i):
        while i < len(text) and text[i] in " \t\n\r":
            i += 1
        return i

    def value(i, key, pointer):
        i = skip(i)
        if text[i] in "{[":
            closing, i = "}" if text[i] == "{" else "]", skip(i + 1)
            if text[i] == closing:
                return i + 1
            item = 0
            while True:
                child, at = key, json_pointer(pointer, item)  # a list item: its list's path, its own pointer
                if closing == "}":
                    name, i = scanstring(text, skip(i) + 1)
                    i = skip(i)
                    if text[i] != ":":
                        raise ValueError("expected ':'")
                    child, at, i = child_path(key, name), json_pointer(pointer, name), i + 1
                item += 1
                i = skip(value(i, child, at))
                if text[i] == closing:
                    return i + 1
                if text[i] != ",":
                    raise ValueError("expected ','")
                i += 1
        if text[i] == '"':
            content, end = scanstring(text, i + 1)
            leaves.append((key, content, i, end, pointer))
            return end
        literal = next((word for word in _LITERALS if text.startswith(word, i)), None)
        if literal:
            leaves.append((key, _LITERALS[literal], i, i + len(literal), pointer))
            return i + len(literal)
        number = _NUMBER.match(text, i)
        if not number:
            raise ValueError("expected a value")
        leaves.append((key, json.loads(number.group()), i, number.end(), pointer))
        return number.end()

    try:
        if skip(value(0, "", "")) != len(text):
            return []
    except (ValueError, IndexError):
        return []
    return leaves


def field_confidences(token_ids: list[int], probabilities: list[float], tokenizer, text: str) -> list[dict]:
    """`{"field", "value", "confidence", "pointer"}` per leaf value of `text` (the decoded `token_ids`; none
    when it is not JSON): the lowest probability among the tokens that overlap the value, with its
    closing quote, or for a number or literal the character after it, since that is where the model
    decided the value was complete."""
    leaves = leaf_spans(text) if parse_json(text) is not None else []
    if not leaves:
        return []
    ends = [len(prefix) for prefix in tokenizer.batch_decode([token_ids[:k + 1] for k in range(len(token_ids))],
                                                               skip_special_tokens=True)]
    for k in range(1, len(ends)):  # a prefix ending inside a UTF-8 character may decode longer
        ends[k] = max(ends[k], ends[k - 1])
    fields = []
    for key, value, start, end, pointer in leaves:
        if not isinstance(value, str):  # the token after a number is where it stopped: 29, not 290
            end = min(end + 1, len(text))
        first, last = bisect.bisect_right(ends, start), bisect.bisect_left(ends, end)
        covering = probabilities[first:last + 1]
        fields.append({"field": key, "value": value, "confidence": round(min(covering), 4) if covering else 1.0,
                       "pointer": pointer})
    return fields


# --- Calibration and the threshold -------------------------------------------------------------

def check_confidence_settings(threshold: float, flag_wrong_share: float) -> None:
    """Refused before training, not after it."""
    if threshold < 0:
        raise FlowError(f"CONFIDENCE_THRESHOLD={threshold}: pass 0 to pick it on the validation split, "
                        "or a confidence between 0 and 1")
    if not 0 < flag_wrong_share <= 1:
        raise FlowError(f"FLAG_WRONG_SHARE={flag_wrong_share}: pass the share of wrong fields the flags "
                        "should catch, above 0 and at most 1 (0.9: nine in ten)")


def pick_threshold(marked: list[tuple[float, bool]], flag_wrong_share: float) -> dict:
    """The smallest threshold whose flags (confidence below it) catch at least `flag_wrong_share`
    of the wrong fields among `marked` (confidence, right), and what it does there. With fewer
    than MINIMUM_WRONG_FIELDS wrong fields, the fallback."""
    wrong = sorted(confidence for confidence, right in marked if not right)
    record = {"flag_wrong_share": flag_wrong_share, "validation_fields": len(marked),
              "validation_wrong_fields": len(wrong)}
    if len(wrong) < MINIMUM_WRONG_FIELDS:
        return {"threshold": FALLBACK_THRESHOLD, "source": "fallback", **record}
    to_catch = math.ceil(flag_wrong_share * len(wrong) - 1e-9)  # 0.28 × 25 is 7.000000000000001 in floats: 7
    # Flags are strict (below), so the threshold is the next float above the last wrong field caught.
    threshold = math.nextafter(wrong[to_catch - 1], math.inf)
    return {"threshold": threshold, "source": "validation", **record,
            "validation_wrong_fields_flagged": sum(confidence < threshold for confidence in wrong) / len(wrong),
            "validation_fields_flagged": sum(confidence < threshold for confidence, _ in marked) / len(marked)}


def _logit(confidence: float) -> float:
    # Confidences are recorded to 4 decimals: clipping at 1e-5 keeps 0.9999 below 1.0 and 0.0001
    # above 0.0, so no two recorded values merge and the ranking survives.
    confidence = min(max(confidence, CLIP), 1 - CLIP)
    return math.log(confidence / (1 - confidence))


def _log_loss(scale: float, scores: list[tuple[float, bool]]) -> float:
    """-log likelihood of the labels under sigmoid(scale × logit), written to never overflow."""
    return sum(max(-x, 0.0) + math.log1p(math.exp(-abs(x))) for x in
               (scale * z if right else -scale * z for z, right in scores))


def fit_temperature(marked: list[tuple[float, bool]]) -> float | None:
    """The temperature T for which sigmoid(logit(confidence) / T) best predicts which fields are
    right (least log loss; Newton's method on 1/T, halving a step that does not help). None with
    fewer than MINIMUM_WRONG_FIELDS right or wrong fields, or where confidence ranks the wrong
    fields higher (T would be negative and turn the ranking round)."""
    right = sum(is_right for _, is_right in marked)
    if min(right, len(marked) - right) < MINIMUM_WRONG_FIELDS:
        return None
    scores = [(_logit(confidence), is_right) for confidence, is_right in marked]
    scale = 1.0
    for _ in range(100):
        probabilities = [(1 / (1 + math.exp(-scale * z)), z, is_right) for z, is_right in scores]
        gradient = sum((p - is_right) * z for p, z, is_right in probabilities)
        curvature = sum(p * (1 - p) * z * z for p, z, _ in probabilities)
        if curvature <= 0:
            break
        step, current = gradient / curvature, _log_loss(scale, scores)
        while abs(step) > 1e-12 and _log_loss(scale - step, scores) > current:
            step /= 2
        scale -= step
        if abs(step) < 1e-9:
            break
    return 1 / scale if scale > 0 else None


def calibrate(confidence: float, temperature: float | None) -> float:
    """sigmoid(logit(confidence) / temperature), unrounded: a temperature below 1 squeezes values
    together near 0 and 1, and any rounding would tie fields that were ranked (down to T ≈ 0.3,
    where 1 - 1e-5 comes within a float's step of 1.0)."""
    if temperature is None:
        return confidence
    return 1 / (1 + math.exp(-_logit(confidence) / temperature))


def calibrate_fields(fields: list[dict] | None, temperature: float | None) -> None:
    """A row's `confidence` entries, calibrated in place; each keeps its `raw_confidence`."""
    if temperature is None:
        return
    for field in fields or []:
        field["raw_confidence"] = field["confidence"]
        field["confidence"] = calibrate(field["confidence"], temperature)


def read_threshold(folder: str) -> dict | None:
    path = os.path.join(folder, RECORD_NAME)
    try:
        record = read_saved_json(path)
    except ValueError:
        record = "not JSON"
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("threshold"), (int, float))
            and isinstance(record.get("source"), str)
            and isinstance(record.get("temperature"), (int, float, type(None)))):
        raise FlowError(f"{path}: not a saved confidence threshold; delete it, or pass --confidence-threshold")
    return record


def threshold_for(setting: float, folders: list[str]) -> dict:
    """The threshold to use: `setting` unless it is 0, else the first one saved in `folders`, else
    the fallback. Says where it came from."""
    return _chosen(setting, ((folder, read_threshold(folder)) for folder in folders))


def _chosen(setting: float, saved) -> dict:
    """`threshold_for` over (folder, its saved record or None) pairs, read only as far as needed."""
    if setting:
        return {"threshold": setting, "source": "given"}
    looked_in = []
    for folder, record in saved:
        if record is not None:
            print(f"confidence threshold: {shown(record['threshold'])} ({record['source']}), from "
                  f"{os.path.join(folder, RECORD_NAME)}")
            return record
        looked_in.append(folder)
    print(f"confidence threshold: {FALLBACK_THRESHOLD}, the fallback: no {RECORD_NAME} in "
          f"{' or '.join(looked_in)}; pass --confidence-threshold to choose one")
    return {"threshold": FALLBACK_THRESHOLD, "source": "fallback"}


# --- What confidence says about a set of scored rows ------------------------------------------

def marked_fields(scored: list["ScoredRow"]) -> list[tuple[float, bool]]:
    """(confidence, right) for every scored predicted field of the rows."""
    return [mark for row in scored for mark in row.marks]


def confidence_auroc(marked: list[tuple[float, bool]]) -> float | None:
    """The chance that a right field has a higher confidence than a wrong one, a tie counting half
    (the Mann-Whitney U over both counts); None without both right and wrong fields."""
    right = sum(is_right for _, is_right in marked)
    wrong = len(marked) - right
    if not right or not wrong:
        return None
    ordered, rank_sum, start = sorted(marked), 0.0, 0
    while start < len(ordered):  # tied confidences share the mean of their ranks (1-based)
        end = start
        while end < len(ordered) and ordered[end][0] == ordered[start][0]:
            end += 1
        rank_sum += (start + end + 1) / 2 * sum(is_right for _, is_right in ordered[start:end])
        start = end
    return (rank_sum - right * (right + 1) / 2) / (right * wrong)


def confidence_ece(marked: list[tuple[float, bool]], bins: int = 10) -> float | None:
    """Expected calibration error: over `bins` equal-width confidence bins (the last one holds 1.0),
    |accuracy - mean confidence| weighted by the bin's share of the fields; None without fields."""
    if not marked:
        return None
    binned = {}
    for confidence, right in marked:
        binned.setdefault(min(int(confidence * bins), bins - 1), []).append((confidence, right))
    return sum(abs(sum(right for _, right in members) - sum(confidence for confidence, _ in members))
               for members in binned.values()) / len(marked)


def confidence_figures(scored: list["ScoredRow"], threshold: float, threshold_source: str = "given") -> dict:
    """Whether confidence means something: how well it ranks right fields above wrong ones
    (`confidence_auroc`) and matches their accuracy (`confidence_ece`); field accuracy at or above
    `threshold` against below it, the share of all fields a confidence below it sends for a check
    and the share of wrong fields it flags. None where nothing falls there."""
    marked = marked_fields(scored)
    sure = [right for confidence, right in marked if confidence >= threshold]
    unsure = [right for confidence, right in marked if confidence < threshold]
    wrong = [confidence < threshold for confidence, right in marked if not right]
    return {"confidence_auroc": confidence_auroc(marked),
            "confidence_ece": confidence_ece(marked),
            "confidence_threshold": threshold,
            "confidence_threshold_source": threshold_source,
            "confident_field_accuracy": sum(sure) / len(sure) if sure else None,
            "unsure_field_accuracy": sum(unsure) / len(unsure) if unsure else None,
            "unsure_field_share": len(unsure) / len(marked) if marked else None,
            "wrong_fields_flagged": sum(wrong) / len(wrong) if wrong else None}


def field_flags(fields: list[dict], threshold: float) -> dict[str, float]:
    """JSON pointer -> confidence of each predicted field (`{"field", "value", "confidence", "pointer"}`)
    below `threshold`, the lowest should one pointer come twice: every leaf, those Donut drops too."""
    flags = {}
    for field in fields:
        if field.get("pointer") is not None and field["confidence"] < threshold:
            flags[field["pointer"]] = min(flags.get(field["pointer"], 1.0), field["confidence"])
    return flags


def training_threshold(setting: float, flag_wrong_share: float, final_dir: str, decode_validation) -> dict:
    """After training: the threshold (and `temperature`) already saved in `final_dir` (a resumed
    run), else `setting` as given, else both fitted on the rows `decode_validation(path)` writes to
    `path` and returns, with raw confidences. What is newly given or fitted is saved in `final_dir`."""
    saved = read_threshold(final_dir)
    if saved is not None and not setting:
        print(f"confidence threshold: {shown(saved['threshold'])} ({saved['source']}), saved in {final_dir}; reused")
        return {"temperature": None, **saved}
    if setting:  # the temperature a resumed run's rows were calibrated with, so its new rows match
        record = {"threshold": setting, "source": "given", "temperature": (saved or {}).get("temperature")}
    else:
        from paligemma_json.metrics import score_rows  # here: metrics reads this module's figures
        rows = decode_validation(os.path.join(os.path.dirname(final_dir), VALIDATION_PREDICTIONS))
        marked = marked_fields(score_rows(rows))
        temperature = fit_temperature(marked)
        record = {**pick_threshold([(calibrate(c, temperature), right) for c, right in marked], flag_wrong_share),
                  "temperature": temperature}
        print(describe_pick(record))
    if saved is None:
        write_json_atomically(record, os.path.join(final_dir, RECORD_NAME))
    return record


def prediction_confidence(setting: float, final_dir: str) -> tuple[float, float | None]:
    """--predict: (threshold, temperature): the threshold given or saved with the model, and the
    temperature saved with it, so new documents are calibrated as the run's test set was."""
    saved = read_threshold(final_dir)
    return _chosen(setting, [(final_dir, saved)])["threshold"], (saved or {}).get("temperature")


def describe_pick(record: dict) -> str:
    if record["source"] == "fallback":
        return (f"confidence threshold: {shown(record['threshold'])}, the fallback: only {record['validation_wrong_fields']} "
                f"wrong fields on the validation split, fewer than {MINIMUM_WRONG_FIELDS} to pick one by")
    calibration = (f"calibrated with temperature {record['temperature']:.3f}, " if record.get("temperature")
                   else f"uncalibrated (no temperature: fewer than {MINIMUM_WRONG_FIELDS} right or wrong fields, "
                        "or confidence ranks the wrong ones higher), ")
    return (f"confidence threshold: {shown(record['threshold'])}, {calibration}picked on the validation split: it flags "
            f"{record['validation_wrong_fields_flagged']:.0%} of its {record['validation_wrong_fields']} wrong "
            f"fields (FLAG_WRONG_SHARE={record['flag_wrong_share']}) and {record['validation_fields_flagged']:.0%} "
            f"of all its {record['validation_fields']} fields")
