"""Scores for predicted JSON, judged as JSON.

`field_f1` and `ted_accuracy` are Donut's (clovaai/donut, `JSONParseEvaluator.cal_f1` / `cal_acc`),
reimplemented so they run without torch or Donut's dependencies, and tested against Donut's own code.
Both follow Donut's normalization: keys sorted, scalars compared as stripped strings (so `3` and
`"3"` are equal), and every falsy value (`""`, `0`, `false`, `null`, `[]`, `{}`) dropped, which leaves
it unscored on both sides. A prediction that is not valid JSON counts as `{}`.

Each row is parsed and matched once (`score_row`, a `ScoredRow`): the figures here, the pictures,
`report.html` and the confidence threshold all read that. (The review page flags `--predict`'s rows,
which have no truth to match, from their confidences alone: `confidence.field_flags`.)
"""

from collections import Counter
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

from rapidfuzz.distance import Levenshtein

from paligemma_json.confidence import FALLBACK_THRESHOLD, confidence_figures
from paligemma_json.json_text import key_paths, parse_json



# --- Donut's normalization and flattening -----------------------------------------------------

def normalize(data):
    """Donut's `normalize_dict`: sorted keys, values as lists of stripped strings, falsy dropped."""
    if not data:
        return {}
    if isinstance(data, dict):
        normalized = {}
        for key in sorted(data, key=lambda k: (len(k), k)):
            value = normalize(data[key])
            if value:
                normalized[key] = value if isinstance(value, list) else [value]
        return normalized
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [item for item in map(normalize, data) if item]
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


def flatten(data) -> list[tuple[str, str]]:
    """(key path, value) pairs of normalized data, list items sharing their parent's key path."""
    return list(key_paths(data))


# --- Donut's tree edit distance (Zhang-Shasha, with Donut's tree and costs) -------------------

def build_tree(data, label: str = "<root>"):
    """Donut's `construct_tree_from_dict` as (label, children): leaves are `<leaf>value`."""
    if isinstance(data, dict):
        return label, [build_tree(value, key) for key, value in data.items()]
    if all(isinstance(item, dict) for item in data):
        return label, [build_tree(item, "<subtree>") for item in data]
    return label, [(f"<leaf>{item}", []) for item in data]


def _insert_or_remove_cost(label: str) -> int:
    return len(label.replace("<leaf>", "")) if "<leaf>" in label else 1


@lru_cache(maxsize=65536)
def _update_cost(label1: str, label2: str) -> int:
    leaf1, leaf2 = "<leaf>" in label1, "<leaf>" in label2
    if leaf1 and leaf2:
        return Levenshtein.distance(label1.replace("<leaf>", ""), label2.replace("<leaf>", ""))
    if leaf1 != leaf2:
        return 1 + len((label2 if leaf2 else label1).replace("<leaf>", ""))
    return int(label1 != label2)


class _PostorderTree:
    """Labels in postorder, each node's leftmost leaf, and the keyroots Zhang-Shasha iterates."""

    def __init__(self, root):
        self.labels, self.leftmost = [], []
        self._visit(root)
        last_with_leftmost = {leftmost: index for index, leftmost in enumerate(self.leftmost)}
        self.keyroots = sorted(last_with_leftmost.values())

    def _visit(self, node):
        first = len(self.labels)  # in postorder, a subtree's leftmost leaf is its first node
        for child in node[1]:
            self._visit(child)
        self.labels.append(node[0])
        self.leftmost.append(first)


def tree_edit_distance(tree1, tree2) -> int:
    """Zhang & Shasha (1989): the exact ordered tree edit distance, as `zss.distance` gives it."""
    a, b = _PostorderTree(tree1), _PostorderTree(tree2)
    subtree_distance = [[0] * len(b.labels) for _ in a.labels]
    for i in a.keyroots:
        for j in b.keyroots:
            _forest_distance(a, b, i, j, subtree_distance)
    return subtree_distance[-1][-1]


def _forest_distance(a, b, i, j, subtree_distance) -> None:
    first_a, first_b = a.leftmost[i], b.leftmost[j]
    rows, cols = i - first_a + 2, j - first_b + 2
    forest = [[0] * cols for _ in range(rows)]
    for x in range(1, rows):
        forest[x][0] = forest[x - 1][0] + _insert_or_remove_cost(a.labels[first_a + x - 1])
    for y in range(1, cols):
        forest[0][y] = forest[0][y - 1] + _insert_or_remove_cost(b.labels[first_b + y - 1])
    for x in range(1, rows):
        node_a = first_a + x - 1
        remove = _insert_or_remove_cost(a.labels[node_a])
        for y in range(1, cols):
            node_b = first_b + y - 1
            best = min(forest[x - 1][y] + remove,
                       forest[x][y - 1] + _insert_or_remove_cost(b.labels[node_b]))
            if a.leftmost[node_a] == first_a and b.leftmost[node_b] == first_b:
                forest[x][y] = min(best, forest[x - 1][y - 1] + _update_cost(a.labels[node_a], b.labels[node_b]))
                subtree_distance[node_a][node_b] = forest[x][y]
            else:
                before_a, before_b = a.leftmost[node_a] - first_a, b.leftmost[node_b] - first_b
                forest[x][y] = min(best, forest[before_a][before_b] + subtree_distance[node_a][node_b])


def ted_accuracy(prediction, truth) -> float:
    """Donut's `cal_acc`: max(0, 1 - TED(pred, truth) / TED(empty, truth)). Donut divides by zero
    on an empty (normalized) truth; we score that row 1.0 if the prediction is empty too, else 0.0."""
    prediction, truth = normalize(prediction), normalize(truth)
    truth_tree = build_tree(truth)
    scale = tree_edit_distance(build_tree({}), truth_tree)
    if scale == 0:
        return float(not prediction)
    return max(0.0, 1 - tree_edit_distance(build_tree(prediction), truth_tree) / scale)


# --- One row, scored once ---------------------------------------------------------------------

def parse_prediction(text: str) -> tuple[object, bool]:
    """`json_text.parse_json`'s value, and whether a key is written twice at one level (`json.loads`
    silently keeps the last, so such a text parses), from one parse."""
    repeated = False

    def check(pairs):
        nonlocal repeated
        repeated = repeated or len({key for key, _ in pairs}) < len(pairs)
        return dict(pairs)
    value = parse_json(text, object_pairs_hook=check)
    return value, repeated and value is not None


def match(pairs: list[tuple[str, str]], pool: Counter) -> list[bool]:
    """Donut's matching, written once: whether each of `pairs`, in order, is still in `pool`; each
    one found is taken out of it, so a value is counted once however often it is asked for."""
    found = []
    for pair in pairs:
        found.append(pool[pair] > 0)
        if found[-1]:
            pool[pair] -= 1
    return found


@dataclass(frozen=True)
class ScoredRow:
    """One prediction row, parsed and matched once: the metrics, the pictures, the HTML report and the
    confidence threshold read it. `statuses` and `confident` see the row as Donut does (values as
    stripped strings, falsy ones dropped); `raw["confidence"]` keeps what that drops: each predicted
    leaf's JSON value, its pointer (which list item) and empty values."""
    raw: dict  # the row as read: image, texts, truncated, confidences
    prediction: object  # parsed: an object or array, None when the text is not JSON
    truth: object  # the parsed `suffix`; None when it is not JSON (a caption) or absent (--predict)
    repeated_keys: bool  # a key written twice at one level of the prediction
    # (status, key path, true value, predicted value) per field, in the truth's order: `right`, `wrong`,
    # `missing` (predicted ""), then the prediction's `extra` fields (true "")
    statuses: list[tuple[str, str, str, str]]
    confident: list[tuple[str, str, float]]  # (key path, value, confidence) per predicted leaf Donut scores
    marks: list[tuple[float, bool]]  # (confidence, right) for those; none where the truth is not JSON

    @property
    def judged_prediction(self):
        """The prediction as scored: `{}` when it is not JSON."""
        return self.prediction if self.prediction is not None else {}

    @cached_property
    def _lowest_confidence(self) -> dict[tuple[str, str], float]:
        lowest = {}
        for key, value, confidence in self.confident:
            lowest[key, value] = min(lowest.get((key, value), 1.0), confidence)
        return lowest

    def confidence_of(self, key: str, value: str, default: float | None = None) -> float | None:
        """The lowest confidence of a scored predicted leaf with this key path and value, to show
        beside its status."""
        return self._lowest_confidence.get((key, value), default)


def score_row(row: dict) -> ScoredRow:
    """`row`'s `prediction` and `suffix` (none for --predict) parsed, and their fields matched."""
    return _scored(row, parse_json(row["suffix"]) if "suffix" in row else None)


def score_rows(rows: list[dict]) -> list[ScoredRow]:
    return [score_row(row) for row in rows]


def _scored(row: dict, truth) -> ScoredRow:
    prediction, repeated = parse_prediction(row["prediction"])
    predicted, true = flatten(normalize(prediction)), flatten(normalize(truth))
    confident = _confident(row.get("confidence") or [], predicted) if prediction is not None else []
    right = match([(key, value) for key, value, _ in confident], Counter(true))
    marks = [] if truth is None else [(confidence, found) for (_, _, confidence), found in zip(confident, right)]
    return ScoredRow(row, prediction, truth, repeated, _statuses(predicted, true), confident, marks)


def _decoded_free(scored: ScoredRow) -> ScoredRow:
    """The row as decoded without the constraint, against the same parsed truth. A row without
    `free_prediction` (an older or --no-constrained run, resumed) was decoded free: it is its own."""
    row = scored.raw
    free = {**row, "truncated": row.get("free_truncated", row.get("truncated"))}
    if "free_prediction" not in row:
        return replace(scored, raw=free)
    # The confidences are the constrained prediction's: the free one has none.
    return _scored({**free, "prediction": row["free_prediction"], "confidence": None}, scored.truth)


def _statuses(predicted: list[tuple[str, str]], true: list[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    unmatched = Counter(predicted)
    statuses = [["right", key, value, value] if found else ["missing", key, value, ""]
                for (key, value), found in zip(true, match(true, unmatched))]
    leftovers = list(unmatched.elements())
    for status in statuses:  # a missing field whose key the prediction has, with another value, is wrong
        for pair in leftovers if status[0] == "missing" else []:
            if pair[0] == status[1]:
                leftovers.remove(pair)
                status[0], status[3] = "wrong", pair[1]
                break
    return [tuple(status) for status in statuses] + [("extra", key, "", value) for key, value in leftovers]


def _confident(fields: list[dict], predicted: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
    """The fields whose value Donut scores: the prediction's own normalized pairs, each used once, so
    a value Donut drops (a falsy one, a boolean in a list) gets no mark."""
    pairs = [(field["field"], str(field["value"]).strip()) for field in fields]
    found = match(pairs, Counter(predicted))
    return [(*pair, field["confidence"]) for pair, field, is_scored in zip(pairs, fields, found) if is_scored]


# --- The report ---------------------------------------------------------------------------------

def char_similarity(prediction: str, truth: str) -> float:
    """1 - Levenshtein distance / length of the longer text; 1.0 for two empty texts."""
    return Levenshtein.normalized_similarity(prediction, truth)


def _anls_star(truth, prediction):
    try:
        from anls_star import anls_score
    except ImportError:
        return None
    return float(anls_score(truth, prediction))


def _ratio(part: float, whole: float, if_empty: float) -> float:
    return part / whole if whole else if_empty


def compute_metrics(rows: list[dict], schema: dict | None = None, threshold: float = FALLBACK_THRESHOLD,
                    threshold_source: str = "given") -> dict:
    """Flat figures over prediction rows (each with `prediction` and `suffix`), plus `per_field`.
    Rows whose `suffix` is not JSON (captions, answers) only count in `char_similarity`. With the
    labels' `schema`, also the share of predictions that validate against it. Rows decoded under the
    constraint carry `free_prediction` too: its figures are added as `free_...`. Rows with
    `confidence` add how well confidence ranks and calibrates the fields, and what a confidence below
    `threshold` (chosen as `threshold_source` says: paligemma_json/confidence.py) flags."""
    return metrics_of(score_rows(rows), schema, threshold, threshold_source)


def metrics_of(scored: list[ScoredRow], schema: dict | None = None, threshold: float = FALLBACK_THRESHOLD,
               threshold_source: str = "given") -> dict:
    """`compute_metrics` of rows already scored."""
    metrics = {"decoding": "constrained" if any("free_prediction" in row.raw for row in scored) else "free",
               **_figures(scored, schema)}
    if metrics["decoding"] == "constrained":
        free = _figures([_decoded_free(row) for row in scored], schema)
        metrics.update({f"free_{name}": value for name, value in free.items()
                        if name not in ("rows", "rows_without_json_target", "per_field")})
    if any("confidence" in row.raw for row in scored):
        metrics.update(confidence_figures(scored, threshold, threshold_source))
    metrics["per_field"] = metrics.pop("per_field")  # the one nested object, last
    return metrics


def _figures(rows: list[ScoredRow], schema: dict | None) -> dict:
    scored = [row for row in rows if row.truth is not None]  # the rows whose target is JSON
    per_field, predicted_per_field, counts = {}, Counter(), Counter()
    for row in scored:
        for status, key, _, _ in row.statuses:
            counts[status] += 1
            if status != "extra":  # each true value is right, wrong or missing
                field = per_field.setdefault(key, {"correct": 0, "support": 0})
                field["support"] += 1
                field["correct"] += status == "right"
            if status != "missing":  # each predicted value is right, wrong (in a true one's place) or extra
                predicted_per_field[key] += 1
    for key, field in per_field.items():
        field["predicted"] = predicted_per_field[key]
        field["accuracy"] = field["correct"] / field["support"]

    true_positives = counts["right"]
    predicted = true_positives + counts["wrong"] + counts["extra"]
    expected = true_positives + counts["wrong"] + counts["missing"]
    errors = predicted + expected - 2 * true_positives  # false positives + false negatives
    count = len(scored)
    metrics = {
        "rows": len(rows),
        "rows_without_json_target": len(rows) - count,
        "json_valid_rate": _ratio(sum(row.prediction is not None for row in scored), count, 0.0),
        "duplicate_key_rate": _ratio(sum(row.repeated_keys for row in scored), count, 0.0),
        "truncated_rate": _ratio(sum(bool(row.raw.get("truncated")) for row in rows), len(rows), 0.0),
        "exact_match": _ratio(sum(row.judged_prediction == row.truth for row in scored), count, 0.0),
        "field_precision": _ratio(true_positives, predicted, float(expected == 0)),
        "field_recall": _ratio(true_positives, expected, float(predicted == 0)),
        "field_f1": _ratio(true_positives, true_positives + errors / 2, 1.0),
        "ted_accuracy": _ratio(sum(ted_accuracy(row.judged_prediction, row.truth) for row in scored), count, 0.0),
        "char_similarity": _ratio(sum(char_similarity(row.raw["prediction"], row.raw["suffix"]) for row in rows),
                                  len(rows), 0.0),
    }
    if schema is not None:
        from jsonschema import Draft202012Validator
        validator = Draft202012Validator(schema)
        metrics["schema_valid_rate"] = _ratio(sum(row.prediction is not None and validator.is_valid(row.prediction)
                                                  for row in scored), count, 0.0)
    anls = [_anls_star(row.truth, row.judged_prediction) for row in scored]
    if scored and None not in anls:
        metrics["anls_star"] = sum(anls) / count
    metrics["per_field"] = dict(sorted(per_field.items(), key=lambda item: (item[1]["accuracy"], item[0])))
    return metrics


def format_metrics_table(metrics: dict, worst_fields: int = 15) -> str:
    """The overall figures, then the fields the model gets wrong most often."""
    width = max([26] + [len(name) + 2 for name in metrics])
    lines = [f"{'metric':<{width}}{'value':>10}"]
    for name, value in metrics.items():
        if name != "per_field":
            shown = f"{value:>10.3f}" if isinstance(value, float) else f"{str(value):>10}"
            lines.append(f"{name:<{width}}{shown}")
    fields = list(metrics.get("per_field", {}).items())
    if fields:
        width = max(26, max(len(name) for name, _ in fields[:worst_fields]) + 2)
        lines += ["", f"{'field (worst first)':<{width}}{'accuracy':>10}{'correct':>9}{'support':>9}{'predicted':>11}"]
        for name, field in fields[:worst_fields]:
            lines.append(f"{name:<{width}}{field['accuracy']:>10.3f}{field['correct']:>9}{field['support']:>9}"
                         f"{field['predicted']:>11}")
        if len(fields) > worst_fields:
            lines.append(f"... and {len(fields) - worst_fields} more fields in metrics.json")
    return "\n".join(lines)
