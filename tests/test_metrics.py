"""The JSON metrics: each figure on hand-made cases, and parity with Donut's own JSONParseEvaluator."""

import glob
import json
import random
import subprocess
import sys
import types
import zipfile

import pytest

from helpers import missing_check
from paligemma_json.metrics import (char_similarity, compute_metrics, flatten, format_metrics_table, normalize,
                                    parse_json, parse_prediction, score_row, ted_accuracy)


@pytest.fixture(scope="session")
def donut(tmp_path_factory):
    """Donut's JSONParseEvaluator from donut-python 1.0.9 (PyPI), loaded from its file. The package
    itself is never installed: it pulls torchvision, timm and datasets."""
    folder = tmp_path_factory.mktemp("donut")
    download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder),
                               "donut-python==1.0.9"], capture_output=True, text=True)
    wheels = glob.glob(str(folder / "donut_python-1.0.9-*.whl"))
    if not wheels:
        missing_check(f"DONUT REFERENCE NOT AVAILABLE, parity unchecked: pip download failed: {download.stderr[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        source = wheel.read("donut/util.py").decode()
    # On the metric path Donut needs only zss and nltk; `datasets` is imported but never used there. The
    # stand-in lives only while Donut's file runs: left in sys.modules, it broke a later test's training
    # (transformers asks `datasets.__spec__`) whenever this fixture ran first.
    stand_in = "datasets" not in sys.modules
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
    module = types.ModuleType("donut_util")
    try:
        exec(compile(source, "donut/util.py", "exec"), module.__dict__)
    finally:
        if stand_in:
            del sys.modules["datasets"]
    return module.JSONParseEvaluator()


MANIFEST = {"route": "R12", "pallet_number": 3, "destination": "Salem DC",
            "products": [{"description": "COLA 2L", "cases": 4, "layers": 1},
                         {"description": "LEMON SODA", "cases": 12, "layers": 2}],
            "total_cases": 16}

CASES = {
    "identical": (MANIFEST, MANIFEST),
    "reordered keys": ({k: MANIFEST[k] for k in reversed(list(MANIFEST))}, MANIFEST),
    "reordered products": ({**MANIFEST, "products": MANIFEST["products"][::-1]}, MANIFEST),
    "numbers as strings": ({**MANIFEST, "pallet_number": "3", "total_cases": "16 "}, MANIFEST),
    "missing field": ({k: v for k, v in MANIFEST.items() if k != "destination"}, MANIFEST),
    "extra field": ({**MANIFEST, "dock": "D04"}, MANIFEST),
    "wrong values": ({**MANIFEST, "route": "R21", "total_cases": 61}, MANIFEST),
    "one product missing": ({**MANIFEST, "products": MANIFEST["products"][:1]}, MANIFEST),
    "nested value wrong": ({**MANIFEST, "products": [{**MANIFEST["products"][0], "cases": 5},
                                                     MANIFEST["products"][1]]}, MANIFEST),
    "invalid JSON as {}": ({}, MANIFEST),
    "falsy values unscored": ({**MANIFEST, "dock": "", "page": 0, "paid": False, "notes": [], "meta": {}},
                              {**MANIFEST, "dock": None, "page": "", "extra": {}}),
    "whitespace string": ({"a": "  "}, {"a": "x", "b": "y"}),
    "list of scalars": ({"tags": ["b", "a", 3]}, {"tags": ["a", "b", "3", " "]}),
    "mixed list keeps scalars": ({"x": [{"k": "v"}, "s", 2.5, True]}, {"x": ["s", "2.5"]}),
    "top-level list": ([{"a": "1"}, {"a": "2"}], [{"a": "1"}, {"a": "3"}]),
    "prediction is a list": ([MANIFEST], MANIFEST),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ted_accuracy_equals_donuts(donut, case):
    prediction, truth = CASES[case]
    assert ted_accuracy(prediction, truth) == pytest.approx(donut.cal_acc(prediction, truth), abs=1e-12)


def test_field_f1_equals_donuts_pooled_over_all_cases(donut):
    predictions = [CASES[case][0] for case in sorted(CASES)]
    truths = [CASES[case][1] for case in sorted(CASES)]
    rows = [{"prediction": json.dumps(p), "suffix": json.dumps(t)} for p, t in zip(predictions, truths)]
    assert compute_metrics(rows)["field_f1"] == pytest.approx(donut.cal_f1(predictions, truths), abs=1e-12)


def random_json(rng, depth=0):
    keys = ["route", "dock", "items", "name", "qty", "a", "bb", "notes"]
    scalars = [lambda: rng.choice(["", " ", "x", "Salem DC", "R12 ", "0", "3"]), lambda: rng.randint(0, 20),
               lambda: rng.choice([0.0, 1.5, 2.0]), lambda: rng.choice([True, False]), lambda: None]
    def value(level):
        kind = rng.random()
        if level < 3 and kind < 0.15:
            return [random_object(level + 1) for _ in range(rng.randint(0, 3))]
        if level < 3 and kind < 0.25:
            return [rng.choice(scalars)() for _ in range(rng.randint(0, 3))]
        if level < 3 and kind < 0.32:
            return random_object(level + 1)
        return rng.choice(scalars)()
    def random_object(level):
        return {key: value(level) for key in rng.sample(keys, rng.randint(0, 5))}
    return random_object(depth)


def mutate(rng, data):
    """A plausible prediction: some fields dropped, changed or added, order shuffled."""
    if isinstance(data, dict):
        items = [(k, mutate(rng, v)) for k, v in data.items() if rng.random() > 0.15]
        if rng.random() < 0.2:
            items.append((rng.choice(["extra", "qty", "route"]), rng.choice(["y", 7, ""])))
        rng.shuffle(items)
        return dict(items)
    if isinstance(data, list):
        return [mutate(rng, item) for item in data if rng.random() > 0.1]
    if rng.random() < 0.25:
        return rng.choice(["x", "Salem", 3, 0, "3", None])
    return data


def test_random_documents_match_donut(donut):
    """300 random nested documents and their mutations: per-row TED accuracy and pooled field F1,
    on the rows Donut can score (a non-empty normalized truth)."""
    rng = random.Random(7)
    pairs = []
    while len(pairs) < 300:
        truth = random_json(rng)
        if normalize(truth):
            pairs.append((mutate(rng, truth) if rng.random() < 0.8 else random_json(rng), truth))
    for prediction, truth in pairs:
        assert ted_accuracy(prediction, truth) == pytest.approx(donut.cal_acc(prediction, truth), abs=1e-12), \
            (prediction, truth)
    rows = [{"prediction": json.dumps(p), "suffix": json.dumps(t)} for p, t in pairs]
    expected = donut.cal_f1([p for p, _ in pairs], [t for _, t in pairs])
    assert compute_metrics(rows)["field_f1"] == pytest.approx(expected, abs=1e-12)


def test_flatten_shares_the_parent_path_for_list_items():
    assert flatten(normalize(MANIFEST)) == [
        ("route", "R12"), ("products.cases", "4"), ("products.layers", "1"), ("products.description", "COLA 2L"),
        ("products.cases", "12"), ("products.layers", "2"), ("products.description", "LEMON SODA"),
        ("destination", "Salem DC"), ("total_cases", "16"), ("pallet_number", "3")]


def test_an_empty_truth_scores_by_our_rule():
    assert ted_accuracy({}, {"a": ""}) == 1.0
    assert ted_accuracy({"a": "x"}, {}) == 0.0


def rows_of(*pairs):
    return [{"prediction": prediction, "suffix": suffix} for prediction, suffix in pairs]


def test_validity_exact_match_and_fields_on_a_small_split():
    truth = json.dumps({"a": "1", "b": "2", "items": [{"c": "3"}, {"c": "4"}]})
    rows = rows_of(
        (json.dumps({"b": "2", "a": "1", "items": [{"c": "3"}, {"c": "4"}]}), truth),  # reordered: exact
        (json.dumps({"a": "1", "items": [{"c": "4"}], "z": "9"}), truth),  # 2 right, 1 extra, 2 missing
        ('{"a": "1", "b": "2", "items": [{"c": "3"}', truth),  # truncated: invalid, scored as {}
        ("a caption", "not JSON either"),  # a non-JSON target: only char_similarity
    )
    metrics = compute_metrics(rows)
    assert metrics["rows"] == 4 and metrics["rows_without_json_target"] == 1
    assert metrics["json_valid_rate"] == pytest.approx(2 / 3)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    # predicted 4 + 3 + 0 = 7 pairs, expected 4 × 3 = 12, matched 4 + 2 = 6
    assert metrics["field_precision"] == pytest.approx(6 / 7)
    assert metrics["field_recall"] == pytest.approx(6 / 12)
    assert metrics["field_f1"] == pytest.approx(2 * (6 / 7) * (6 / 12) / (6 / 7 + 6 / 12))
    assert metrics["per_field"]["items.c"] == {"correct": 3, "support": 6, "predicted": 3, "accuracy": 0.5}
    assert metrics["per_field"]["a"] == {"correct": 2, "support": 3, "predicted": 2, "accuracy": 2 / 3}
    assert "z" not in metrics["per_field"]  # per field means per field of the truth
    assert list(metrics["per_field"])[0] == "b"  # worst first: b is right 1 time in 3
    assert 0 < metrics["anls_star"] < 1
    flat = {k: v for k, v in metrics.items() if k not in ("per_field", "decoding")}
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert metrics["decoding"] == "free" and not any(k.startswith("free_") for k in metrics)


def test_char_similarity_is_one_minus_normalized_levenshtein():
    assert char_similarity("abcd", "abcd") == 1.0
    assert char_similarity("abcd", "abxd") == pytest.approx(0.75)
    assert char_similarity("", "") == 1.0
    assert char_similarity("ab", "abcd") == pytest.approx(0.5)


def test_parse_json_accepts_objects_and_arrays_only():
    assert parse_json('{"a": 1}') == {"a": 1} and parse_json("[1]") == [1]
    assert parse_json("3") is None and parse_json('"text"') is None and parse_json('{"a": [1, 2') is None


def test_the_table_lists_overall_figures_then_worst_fields():
    table = format_metrics_table(compute_metrics(rows_of(('{"a": "1", "b": "x"}', '{"a": "1", "b": "2"}'))))
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"] and "field_f1" in table
    fields = [line.split()[0] for line in lines[lines.index("") + 2:]]
    assert fields == ["b", "a"]


def test_field_statuses_mark_right_wrong_missing_and_extra():
    def field_statuses(prediction, truth):
        return score_row({"prediction": prediction, "suffix": truth}).statuses

    truth = json.dumps({"a": "1", "b": "2", "c": "3"})
    statuses = field_statuses(json.dumps({"a": "1", "b": "9", "d": "4"}), truth)
    assert sorted(statuses) == sorted([("right", "a", "1", "1"), ("wrong", "b", "2", "9"), ("missing", "c", "3", ""),
                                       ("extra", "d", "", "4")])
    assert {status for status, _, _, _ in field_statuses("{not json", truth)} == {"missing"}


def test_duplicate_keys_and_truncation_are_counted():
    def has_duplicate_keys(text):
        return parse_prediction(text)[1]

    assert has_duplicate_keys('{"a": 1, "b": {"c": 1, "c": 2}}') and not has_duplicate_keys('{"a": {"a": 1}}')
    assert not has_duplicate_keys('[{"a": 1}, {"a": 2}]') and not has_duplicate_keys('{"a": ')
    rows = [{"prediction": '{"a": "1", "a": "2"}', "suffix": '{"a": "2"}', "truncated": False},
            {"prediction": '{"a": "2"', "suffix": '{"a": "2"}', "truncated": True},
            {"prediction": '{"a": "2"}', "suffix": '{"a": "2"}'}]  # an older file, without the flag
    metrics = compute_metrics(rows)
    assert metrics["duplicate_key_rate"] == pytest.approx(1 / 3) and metrics["truncated_rate"] == pytest.approx(1 / 3)
    assert metrics["json_valid_rate"] == pytest.approx(2 / 3)  # the duplicate still parses: hence the rate


def test_evaluation_parses_each_text_once(tmp_path, monkeypatch):
    """metrics.json, predictions.png and report.html all read one scored row per prediction."""
    from paligemma_json.evaluation import evaluate_predictions
    confidence = [{"field": "a", "value": "1", "confidence": 0.4, "pointer": "/a"}]
    rows = [{"prediction": '{"a": "1", "b": [1, 2]}', "suffix": '{"a": "1", "b": [2]}', "confidence": confidence,
             "free_prediction": '{"a": "2"', "free_truncated": True},
            {"prediction": '{"a": "1", "a": "3"}', "suffix": '{"a": "3"}', "confidence": confidence},
            {"prediction": '{"a": ', "suffix": '{"b": "2"}', "confidence": []},  # not JSON
            {"prediction": "a caption", "suffix": "the caption"}]
    texts = [row[key] for row in rows for key in ("prediction", "suffix", "free_prediction") if key in row]
    assert len(set(texts)) == len(texts)
    parsed, loads = {}, json.loads

    def counted(text, *args, **kwargs):
        parsed[text] = parsed.get(text, 0) + 1
        return loads(text, *args, **kwargs)
    monkeypatch.setattr(json, "loads", counted)
    evaluate_predictions(rows, str(tmp_path), threshold=0.5)
    assert {text: parsed.get(text, 0) for text in texts} == dict.fromkeys(texts, 1)
