"""Confidence you can act on: how well it ranks and calibrates the fields (hand-counted), and the
threshold picked on validation, saved beside the model and read back by --predict and --evaluate."""

import json
import math
import os
import re

import pytest
import torch

import finetune_paligemma2 as flow
from paligemma_json import FlowError
from paligemma_json.confidence import (calibrate, calibrate_fields, check_confidence_settings, confidence_auroc,
                                       confidence_ece, describe_pick, fit_temperature, marked_fields, pick_threshold,
                                       field_flags, prediction_confidence, shown, threshold_for, training_threshold)
from paligemma_json.evaluation import evaluate_file
from paligemma_json.metrics import compute_metrics, score_rows
from helpers import read_jsonl

# (confidence, right): right fields at 0.9, 0.8, 0.6; wrong ones at 0.8 and 0.3.
MARKED = [(0.9, True), (0.8, False), (0.8, True), (0.3, False), (0.6, True)]


def test_auroc_counts_right_above_wrong_and_ties_half():
    # Pairs (right, wrong): 0.9>0.8, 0.9>0.3, 0.8=0.8 (half), 0.8>0.3, 0.6<0.8, 0.6>0.3: 4.5 of 6.
    assert confidence_auroc(MARKED) == pytest.approx(4.5 / 6)
    assert confidence_auroc(list(reversed(MARKED))) == pytest.approx(4.5 / 6)  # order does not matter
    assert confidence_auroc([(0.2, True), (0.2, True), (0.2, False)]) == pytest.approx(0.5)  # all tied
    assert confidence_auroc([(0.1, True), (0.9, False)]) == 0.0


def test_auroc_is_none_without_both_right_and_wrong_fields():
    assert confidence_auroc([(0.9, True), (0.4, True)]) is None
    assert confidence_auroc([(0.9, False)]) is None
    assert confidence_auroc([]) is None


def test_ece_weighs_each_bins_gap_by_its_fields():
    # Bins: 0.9 {right}: |1 - 0.9|; 0.8 {wrong, right}: |1 - 1.6|; 0.6 {right}: |1 - 0.6|;
    # 0.3 {wrong}: |0 - 0.3|. (0.1 + 0.6 + 0.4 + 0.3) / 5 fields.
    assert confidence_ece(MARKED) == pytest.approx(1.4 / 5)
    # 1.0 belongs to the last bin, [0.9, 1.0]: |1 - 1.9| / 2, not (|0 - 1.0| + |1 - 0.9|) / 2.
    assert confidence_ece([(1.0, False), (0.9, True)]) == pytest.approx(0.45)
    assert confidence_ece([(0.35, True), (0.35, True)]) == pytest.approx(0.65)
    assert confidence_ece([]) is None


def test_the_metrics_report_auroc_ece_and_the_thresholds_source():
    truth = json.dumps({"a": "x", "b": "y", "c": "z", "d": "w"})
    prediction = {"a": "x", "b": "q", "c": "z", "d": "p"}
    row = {"suffix": truth, "prediction": json.dumps(prediction),
           "confidence": [{"field": key, "value": value, "confidence": confidence}
                          for (key, value), confidence in zip(prediction.items(), (0.9, 0.8, 0.8, 0.3))]}
    metrics = compute_metrics([row], threshold=0.5, threshold_source="validation")
    assert metrics["confidence_auroc"] == pytest.approx(3.5 / 4)  # a=0.9, c=0.8 against b=0.8, d=0.3
    assert metrics["confidence_ece"] == pytest.approx((0.1 + 0.6 + 0.3) / 4)
    assert metrics["confidence_threshold"] == 0.5 and metrics["confidence_threshold_source"] == "validation"
    assert metrics["wrong_fields_flagged"] == 0.5 and metrics["unsure_field_share"] == 0.25


def wrong_and_right(wrong, right):
    return [(confidence, False) for confidence in wrong] + [(confidence, True) for confidence in right]


def test_a_confidence_on_the_threshold_is_sure_on_the_page_as_in_the_metrics():
    """The review page flags below the threshold, as the metrics count: a raw confidence (4 decimals)
    equal to a given threshold is sure in both, one just under it flagged in both."""
    fields = [{"field": "copy", "value": "1", "confidence": 0.25, "pointer": "/copy"},
              {"field": "total", "value": "7", "confidence": 0.2499, "pointer": "/total"},
              {"field": "date", "value": "x", "confidence": 0.2501, "pointer": "/date"}]
    row = {"prefix": "", "suffix": '{"copy": "1", "total": "7", "date": "x"}',
           "prediction": '{"copy": "1", "total": "7", "date": "x"}', "confidence": fields}
    assert field_flags(fields, 0.25) == {"/total": 0.2499}
    assert compute_metrics([row], threshold=0.25)["unsure_field_share"] == pytest.approx(1 / 3)


def test_a_threshold_is_shown_to_4_significant_digits_and_compared_unrounded():
    record = {"threshold": 0.13980783571249336, "source": "validation", "temperature": 0.5, "flag_wrong_share": 0.9,
              "validation_wrong_fields_flagged": 0.9, "validation_wrong_fields": 10, "validation_fields_flagged": 0.8,
              "validation_fields": 20}
    assert shown(record["threshold"]) == "0.1398" and shown(0.8) == "0.8"
    assert describe_pick(record).startswith("confidence threshold: 0.1398, calibrated")
    fields = [{"field": "a", "value": "1", "confidence": 0.1398, "pointer": "/a"}]
    assert field_flags(fields, record["threshold"]) == {"/a": 0.1398}  # below the unrounded threshold


def test_the_picked_threshold_is_the_smallest_that_catches_the_share():
    wrong = [0.95, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    marked = wrong_and_right(wrong, [0.99] * 5 + [0.5])
    record = pick_threshold(marked, 0.9)
    threshold = record["threshold"]
    assert record["source"] == "validation" and record["validation_wrong_fields"] == 10
    assert sum(confidence < threshold for confidence in wrong) == 9  # 9 of 10 caught
    assert math.nextafter(threshold, 0) == 0.9  # just above 0.9: no smaller float catches 9
    assert sum(confidence < 0.9 for confidence in wrong) == 8
    assert record["validation_wrong_fields_flagged"] == 0.9
    assert record["validation_fields_flagged"] == pytest.approx(10 / 16)  # 9 wrong and the right 0.5
    # 0.28 × 25 is 7.000000000000001 in floats: still 7 to catch, not 8.
    many = [i / 100 for i in range(1, 26)]
    assert sum(c < pick_threshold(wrong_and_right(many, []), 0.28)["threshold"] for c in many) == 7
    assert sum(confidence < pick_threshold(marked, 0.7)["threshold"] for confidence in wrong) == 7
    assert sum(confidence < pick_threshold(marked, 1.0)["threshold"] for confidence in wrong) == 10
    assert sum(confidence < pick_threshold(marked, 0.85)["threshold"] for confidence in wrong) == 9  # 8.5: 9


def test_tied_wrong_fields_are_caught_together():
    record = pick_threshold(wrong_and_right([0.5] * 6, [0.5, 0.9]), 0.5)
    assert record["validation_wrong_fields_flagged"] == 1.0 and record["validation_fields_flagged"] == 7 / 8


def test_fewer_than_five_wrong_fields_keep_the_fallback(capsys):
    record = pick_threshold(wrong_and_right([0.1, 0.2, 0.3, 0.4], [0.9] * 20), 0.9)
    assert record == {"threshold": 0.8, "source": "fallback", "flag_wrong_share": 0.9,
                      "validation_fields": 24, "validation_wrong_fields": 4}
    assert pick_threshold(wrong_and_right([0.1, 0.2, 0.3, 0.4, 0.5], []), 0.9)["source"] == "validation"


def test_bad_settings_are_refused_in_one_line():
    check_confidence_settings(0.0, 0.9)
    check_confidence_settings(0.7, 1.0)
    for threshold, share, named in [(-0.1, 0.9, "CONFIDENCE_THRESHOLD"), (0.0, 0.0, "FLAG_WRONG_SHARE"),
                                    (0.0, 1.5, "FLAG_WRONG_SHARE")]:
        with pytest.raises(FlowError, match=named):
            check_confidence_settings(threshold, share)


def validation_rows(wrong_count):
    """One row whose first `wrong_count` fields are wrong, confidences 0.1, 0.2, ..."""
    keys = [f"k{i}" for i in range(8)]
    prediction = {key: ("bad" if i < wrong_count else "ok") for i, key in enumerate(keys)}
    return [{"suffix": json.dumps({key: "ok" for key in keys}), "prediction": json.dumps(prediction),
             "confidence": [{"field": key, "value": prediction[key], "confidence": (i + 1) / 10}
                            for i, key in enumerate(keys)]}]


def test_after_training_the_threshold_is_picked_on_validation_and_saved(tmp_path, capsys):
    final = tmp_path / "final"
    final.mkdir()
    decoded = []

    def decode(path):
        decoded.append(path)
        return validation_rows(6)

    record = training_threshold(0.0, 0.5, str(final), decode)
    assert decoded == [str(tmp_path / "validation_predictions.jsonl")]
    assert record["source"] == "validation" and math.nextafter(record["threshold"], 0) == 0.3  # 3 of 6 wrong
    assert json.loads((final / "confidence.json").read_text()) == record
    assert "picked on the validation split: it flags 50% of its 6 wrong fields" in capsys.readouterr().out

    def must_not_decode(path):
        raise AssertionError("a saved threshold must be reused, not picked again")
    assert training_threshold(0.0, 0.9, str(final), must_not_decode) == record  # --resume of a finished run
    assert "reused" in capsys.readouterr().out
    given = training_threshold(0.6, 0.9, str(final), must_not_decode)
    assert given == {"threshold": 0.6, "source": "given", "temperature": None}  # 2 right fields: none fitted
    assert json.loads((final / "confidence.json").read_text()) == record  # the saved one is kept


def test_a_given_threshold_is_saved_and_too_few_wrong_fields_fall_back(tmp_path, capsys):
    (tmp_path / "given").mkdir()
    training_threshold(0.7, 0.9, str(tmp_path / "given"), lambda path: pytest.fail("given: nothing to pick"))
    assert json.loads((tmp_path / "given" / "confidence.json").read_text()) == {
        "threshold": 0.7, "source": "given", "temperature": None}
    (tmp_path / "few").mkdir()
    record = training_threshold(0.0, 0.9, str(tmp_path / "few"), lambda path: validation_rows(4))
    assert record["threshold"] == 0.8 and record["source"] == "fallback"
    assert "the fallback: only 4 wrong fields on the validation split" in capsys.readouterr().out


def test_threshold_for_uses_the_given_then_the_first_saved_then_the_fallback(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "confidence.json").write_text(json.dumps({"threshold": 0.42, "source": "validation"}))
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert threshold_for(0.3, folders) == {"threshold": 0.3, "source": "given"}
    assert threshold_for(0.0, folders)["threshold"] == 0.42
    assert f"0.42 (validation), from {tmp_path / 'b' / 'confidence.json'}" in capsys.readouterr().out
    assert threshold_for(0.0, folders[:1]) == {"threshold": 0.8, "source": "fallback"}
    assert "the fallback: no confidence.json" in capsys.readouterr().out
    (tmp_path / "a" / "confidence.json").write_text('{"threshold": "high"}')
    with pytest.raises(FlowError, match="not a saved confidence threshold"):
        threshold_for(0.0, folders)


def test_evaluate_uses_the_threshold_saved_beside_the_predictions(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(validation_rows(6)[0]) + "\n")  # wrong fields at 0.1 ... 0.6
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "confidence.json").write_text(json.dumps({"threshold": 0.35, "source": "validation"}))
    metrics = evaluate_file(str(path))  # a run's directory: its final/confidence.json
    assert metrics["confidence_threshold"] == 0.35 and metrics["confidence_threshold_source"] == "validation"
    assert metrics["wrong_fields_flagged"] == 0.5  # 0.1, 0.2, 0.3 of six
    (tmp_path / "confidence.json").write_text(json.dumps({"threshold": 0.65, "source": "given"}))
    assert evaluate_file(str(path))["wrong_fields_flagged"] == 1.0  # a copy beside the file comes first
    assert evaluate_file(str(path), threshold=0.15)["confidence_threshold_source"] == "given"
    assert json.loads((tmp_path / "metrics.json").read_text())["confidence_threshold"] == 0.15


def calibrated_groups(temperature):
    """1,000 fields at each confidence, of which exactly the share sigmoid(logit(c) / T) is right."""
    marked = []
    for confidence in (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95):  # not 0.5, which no T moves
        share = 1 / (1 + math.exp(-math.log(confidence / (1 - confidence)) / temperature))
        right = round(1000 * share)
        marked += [(confidence, True)] * right + [(confidence, False)] * (1000 - right)
    return marked


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_the_fitted_temperature_is_the_one_the_fields_follow(temperature):
    assert fit_temperature(calibrated_groups(temperature)) == pytest.approx(temperature, rel=0.01)


def test_no_temperature_without_enough_of_both_kinds_or_with_a_reversed_ranking():
    assert fit_temperature(wrong_and_right([0.1] * 50, [0.9] * 4)) is None
    assert fit_temperature(wrong_and_right([0.1] * 4, [0.9] * 50)) is None
    assert fit_temperature(wrong_and_right([0.9, 0.8, 0.95, 0.85, 0.7], [0.1, 0.2, 0.05, 0.3, 0.15])) is None


def test_calibration_keeps_the_order_and_the_raw_confidence():
    raw = [0.0, 0.0001, 0.0002, 0.1, 0.1001, 0.5, 0.9998, 0.9999, 1.0]
    for temperature in (0.35, 0.6, 3.0):
        calibrated = [calibrate(c, temperature) for c in raw]
        assert all(a < b for a, b in zip(calibrated, calibrated[1:]))  # no two merged, none swapped
        assert all(0 <= c <= 1 for c in calibrated) and calibrate(0.5, temperature) == 0.5
    assert calibrate(0.3, 0.5) == pytest.approx(0.3 ** 2 / (0.3 ** 2 + 0.7 ** 2), abs=1e-6)  # logit doubled
    assert calibrate(0.37, None) == 0.37
    fields = [{"field": "a", "value": 1, "confidence": 0.3}]
    calibrate_fields(fields, 0.5)
    assert fields == [{"field": "a", "value": 1, "confidence": calibrate(0.3, 0.5), "raw_confidence": 0.3}]
    calibrate_fields(fields, None)
    assert fields[0]["raw_confidence"] == 0.3


def test_the_threshold_is_picked_on_the_calibrated_validation_fields(tmp_path):
    marked = calibrated_groups(0.5)
    rows = [{"suffix": json.dumps({"k": "ok"}), "prediction": json.dumps({"k": "ok" if right else "bad"}),
             "confidence": [{"field": "k", "value": "ok" if right else "bad", "confidence": c}]} for c, right in marked]
    record = training_threshold(0.0, 0.9, str(tmp_path), lambda path: rows)
    assert record["temperature"] == pytest.approx(0.5, rel=0.01)
    calibrated_wrong = [calibrate(c, record["temperature"]) for c, right in marked if not right]
    assert record == {**pick_threshold([(calibrate(c, record["temperature"]), right) for c, right in marked], 0.9),
                      "temperature": record["temperature"]}
    assert sum(c < record["threshold"] for c in calibrated_wrong) >= 0.9 * len(calibrated_wrong)
    # 90% of the wrong fields lie at raw 0.6 or below: calibrated, 0.6 is 0.692.
    assert math.nextafter(record["threshold"], 0) == calibrate(0.6, record["temperature"])
    assert prediction_confidence(0.0, str(tmp_path)) == (record["threshold"], record["temperature"])
    assert prediction_confidence(0.4, str(tmp_path)) == (0.4, record["temperature"])  # rows still calibrated
    resumed = training_threshold(0.4, 0.9, str(tmp_path), lambda path: pytest.fail("given: nothing to pick"))
    assert resumed == {"threshold": 0.4, "source": "given", "temperature": record["temperature"]}


@pytest.mark.parametrize("setting", [0.0, 0.4])
def test_each_run_reads_the_saved_threshold_once(tmp_path, monkeypatch, setting):
    import paligemma_json.confidence as confidence
    (tmp_path / "confidence.json").write_text(json.dumps({"threshold": 0.42, "source": "validation",
                                                          "temperature": 0.7}))
    reads = []
    monkeypatch.setattr(confidence, "read_saved_json", lambda path: reads.append(path) or json.load(open(path)))
    assert prediction_confidence(setting, str(tmp_path)) == (setting or 0.42, 0.7)
    training_threshold(setting, 0.9, str(tmp_path), lambda path: pytest.fail("saved or given: nothing to pick"))
    assert reads == [str(tmp_path / "confidence.json")] * 2  # one read for --predict, one for training


# --- The whole flow: the shared --demo run (tests/conftest.py) -----------------------------------

def test_the_demo_picks_its_threshold_on_validation_and_reports_it_on_test(run):
    output_dir, result = run
    record = json.load(open(os.path.join(output_dir, "final", "confidence.json")))
    valid = read_jsonl(os.path.join(output_dir, "validation_predictions.jsonl"))
    truth = read_jsonl(os.path.join(output_dir, "demo-dataset", "valid", "annotations.jsonl"))
    assert [row["image"] for row in valid] == [row["image"] for row in truth]
    assert all(row["confidence"] for row in valid) and not any("free_prediction" in row for row in valid)
    # The tiny model guesses most values: plenty of wrong (and some right) validation fields.
    raw = marked_fields(score_rows(valid))
    temperature = fit_temperature(raw)
    assert temperature is not None and record["temperature"] == temperature
    calibrated = [(calibrate(c, temperature), right) for c, right in raw]
    assert record == {**pick_threshold(calibrated, 0.9), "temperature": temperature}
    assert record["source"] == "validation" and describe_pick(record) in result.stdout
    rows = read_jsonl(os.path.join(output_dir, "predictions.jsonl"))  # calibrated, the raw figure kept
    assert all(field["confidence"] == calibrate(field["raw_confidence"], temperature)
               for row in rows for field in row["confidence"])

    metrics = json.load(open(os.path.join(output_dir, "metrics.json")))
    tested = marked_fields(score_rows(read_jsonl(os.path.join(output_dir, "predictions.jsonl"))))
    assert metrics["confidence_threshold"] == record["threshold"]
    assert metrics["confidence_threshold_source"] == "validation"
    assert metrics["confidence_auroc"] == confidence_auroc(tested) and 0 <= metrics["confidence_auroc"] <= 1
    raw_rows = [{**row, "confidence": [{**f, "confidence": f["raw_confidence"]} for f in row["confidence"]]}
                for row in rows]
    # calibration ranks as raw does
    assert metrics["confidence_auroc"] == confidence_auroc(marked_fields(score_rows(raw_rows)))
    assert metrics["confidence_ece"] == confidence_ece(tested) and 0 <= metrics["confidence_ece"] <= 1
    wrong = [confidence for confidence, right in tested if not right]
    assert metrics["wrong_fields_flagged"] == sum(c < record["threshold"] for c in wrong) / len(wrong)
    assert metrics["unsure_field_share"] == sum(c < record["threshold"] for c, _ in tested) / len(tested)


def test_validation_is_decoded_as_the_test_set_is(run):
    """The first batch of validation_predictions.jsonl again, from final/ under the schema's
    constraint with confidence, as step 8 decodes the test set."""
    output_dir, result = run
    final = os.path.join(output_dir, "final")
    processor = flow.load_processor(final)
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(final).eval()
    constraint = flow.build_constraint(json.load(open(os.path.join(final, "schema.json"))), processor, True)
    valid = flow.load_splits(os.path.join(output_dir, "demo-dataset"), "extract data in JSON format")["valid"]
    budget = int(re.search(r"^MAX_NEW_TOKENS=(\d+)", result.stdout, re.M)[1])
    again = flow.generate_batch(model, processor, [valid[i] for i in range(8)], flow.GenerationSettings(torch.float32, budget),
                                constraint)
    saved = read_jsonl(os.path.join(output_dir, "validation_predictions.jsonl"))[:8]
    assert [row["prediction"] for row in again] == [row["prediction"] for row in saved]
    assert [f["confidence"] for row in again for f in row["confidence"]] == pytest.approx(
        [f["confidence"] for row in saved for f in row["confidence"]], abs=1e-3)
