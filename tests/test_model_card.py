"""The model card (`final/README.md`): a YAML header the Hub reads, the test figures exactly as in
metrics.json, and loading code that works as written. The LoRA card is checked on conftest's short
LoRA run, the merged card in tests/test_merge.py, the push after scoring in tests/test_push.py and
tests/test_secrets.py."""

import json
import os
import shlex
import shutil

from helpers import assert_card_figures_match, card_header, free_prediction, run_card_code, run_flow
from paligemma_json import model_card
from paligemma_json.demo import DEMO_OVERRIDES


def test_gemma_license_only_for_googles_paligemma2_ids(tmp_path, monkeypatch):
    assert model_card.card_license("google/paligemma2-3b-pt-448") == "gemma"
    assert model_card.card_license("google/paligemma2-10b-mix-448") == "gemma"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "google" / "paligemma2-3b-pt-224").mkdir(parents=True)  # a local copy, shaped like a Hub id
    for other in ("someone/paligemma2-3b-pt-448", "google/gemma-2-2b", str(tmp_path), "./paligemma2-3b",
                  "google/paligemma2-3b-pt-224", None):
        assert model_card.card_license(other) is None

    named = card_header("---\n" + model_card._yaml(model_card.card_header("google/paligemma2-3b-pt-448", "peft",
                                                                           "lora", "local:x")) + "\n---\n")
    assert named["license"] == "gemma" and named["base_model"] == "google/paligemma2-3b-pt-448"
    local = card_header("---\n" + model_card._yaml(model_card.card_header(str(tmp_path), "peft", "lora",
                                                                           "local:x")) + "\n---\n")
    # The Hub refuses a commit whose card names a path as its base_model: a local base goes unnamed.
    assert "license" not in local and "base_model" not in local and local["library_name"] == "peft"


def test_a_qlora_adapter_on_a_hub_base_and_its_merged_card(tmp_path):
    """Written without training: an adapter_config.json naming a Hub base is all the card reads of final/."""
    import finetune_paligemma2 as flow
    final, merged = tmp_path / "run" / "final", tmp_path / "run" / "merged"
    final.mkdir(parents=True)
    merged.mkdir()
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "google/paligemma2-3b-pt-448"}))
    (final / "schema.json").write_text("{}")
    metrics = {"decoding": "constrained", "rows": 3, "json_valid_rate": 2 / 3, "free_json_valid_rate": 1 / 3,
               "field_f1": 0.123456789012, "free_field_f1": 0.1, "anls_star": 0.5, "per_field": {}}
    settings = {**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path / "run"), "USE_QLORA": True, "MAX_NEW_TOKENS": 300,
                "DATASET_DIR": str(tmp_path / "pallet-load-manifest-json-2")}
    schema = {"type": "object", "properties": {"route": {"type": "string"}, "products": {"type": "array"}},
              "required": ["route"]}
    model_card.write_model_card(str(final), metrics, schema, "extract data in JSON format", settings, 1,
                                "someone/pallet")
    card = (final / "README.md").read_text()
    header = card_header(card)
    assert header == {"base_model": "google/paligemma2-3b-pt-448", "library_name": "peft", "license": "gemma",
                      "pipeline_tag": "image-text-to-text", "tags": header["tags"],
                      "training_data": "local:pallet-load-manifest-json-2"}
    assert "qlora" in header["tags"]
    assert_card_figures_match(card, metrics)
    assert "- `route`: string\n- `products`: list (not in every label)" in card
    assert "quantization_config=BitsAndBytesConfig(load_in_4bit=True" in card and "--use-qlora" in card
    assert "PeftModel.from_pretrained(base, 'someone/pallet')" in card
    assert "hf download someone/pallet --local-dir my-run/final\npython finetune_paligemma2.py --output-dir my-run " \
        in card

    model_card.write_merged_card(str(final), str(merged), "google/paligemma2-3b-pt-448", str(merged))
    merged_card = (merged / "README.md").read_text()
    merged_header = card_header(merged_card)
    assert merged_header["library_name"] == "transformers" and merged_header["license"] == "gemma"
    assert merged_header["base_model"] == "google/paligemma2-3b-pt-448" and "merged" in merged_header["tags"]
    assert_card_figures_match(merged_card, metrics)
    assert "peft" not in merged_card.split("```python")[1] and "BitsAndBytesConfig" not in merged_card
    assert f"from_pretrained({str(merged)!r}" in merged_card and "max_new_tokens=300" in merged_card
    assert (merged / "schema.json").read_text() == "{}"


def test_the_dataset_is_named_by_where_it_came_from(tmp_path):
    assert model_card.dataset_source(str(tmp_path), demo=True) == "synthetic demo"
    assert model_card.dataset_source(str(tmp_path / "my-export") + "/", demo=False) == "local:my-export"
    model_card.record_roboflow_source(str(tmp_path), "acme", "manifests", 3)
    assert model_card.dataset_source(str(tmp_path), demo=False) == "roboflow:acme/manifests/3"


def test_the_demo_card_holds_its_figures_and_loads_as_written(demo_run, monkeypatch, tmp_path):
    output_dir = demo_run[0]
    card = open(os.path.join(output_dir, "final", "README.md"), encoding="utf-8").read()
    header = card_header(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "image-text-to-text"
    assert header["training_data"] == "synthetic demo" and "full-fine-tune" in header["tags"]
    assert "license" not in header and "base_model" not in header  # the demo's tiny model is a local folder
    assert_card_figures_match(card, json.load(open(os.path.join(output_dir, "metrics.json"))))

    schema = json.load(open(os.path.join(output_dir, "final", "schema.json")))
    assert all(f"\n- `{field}`: " in card for field in schema["properties"])
    assert f"`<image>` then `{DEMO_OVERRIDES['PROMPT']}`" in card
    batch = DEMO_OVERRIDES["BATCH_SIZE"] * DEMO_OVERRIDES["GRAD_ACCUM"]
    assert f"- Effective batch: {batch} (" in card and f"{DEMO_OVERRIDES['MAX_STEPS']} optimizer steps" in card

    # The transformers code reads a test image as the run did, free (the same greedy decoding).
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "predictions.jsonl"))]
    assert run_card_code(card, rows[2]["image_path"]) == free_prediction(rows[2])

    # The --predict command, as written, on a copy of the run and one image: the run's constrained answer.
    command = shlex.split(card.split("```bash\n", 1)[1].split("\n```", 1)[0])
    assert command[:2] == ["python", "finetune_paligemma2.py"]
    args = [str(tmp_path) if arg == os.path.abspath(output_dir) else rows[2]["image_path"] if arg == "photos/"
            else arg for arg in command[2:]]
    shutil.copytree(os.path.join(output_dir, "final"), tmp_path / "final")
    run_flow(monkeypatch, *args)
    predicted = [json.loads(line) for line in open(tmp_path / "predict.jsonl")]
    assert [row["prediction"] for row in predicted] == [rows[2]["prediction"]]


def test_the_lora_card_replaces_pefts_and_loads_the_adapter_as_written(lora_run, demo_assets):
    card = open(os.path.join(lora_run, "final", "README.md"), encoding="utf-8").read()
    header = card_header(card)
    assert header["library_name"] == "peft" and "lora" in header["tags"] and header["training_data"] == "local:export"
    assert "base_model" not in header and "license" not in header  # a local base (tests/test_model_card.py)
    assert "[More Information Needed]" not in card  # peft's own template, written with the adapter, is gone
    assert f"A LoRA adapter for `{demo_assets[1]}`" in card and "- Method: LoRA, rank 8, on q_proj, " in card
    assert_card_figures_match(card, json.load(open(os.path.join(lora_run, "metrics.json"))))
    rows = [json.loads(line) for line in open(os.path.join(lora_run, "predictions.jsonl"))]
    assert run_card_code(card, rows[1]["image_path"]) == free_prediction(rows[1])
