"""`--merge`: a LoRA run's adapter folded into a standalone model that generates as base plus adapter,
with its own card; a full fine-tune is refused."""

import json
import os

import torch

import finetune_paligemma2 as flow
from helpers import assert_card_figures_match, card_header, free_prediction, run_card_code, run_script


def test_merge_gives_a_standalone_model_that_generates_like_base_plus_adapter(lora_run, demo_assets, small_export):
    from peft import PeftModel
    result = run_script("--output-dir", lora_run, "--merge")
    assert result.returncode == 0, result.stderr[-2000:]
    merged_dir = os.path.join(lora_run, "merged")
    assert not os.path.isfile(os.path.join(merged_dir, "adapter_config.json"))
    merged = flow.PaliGemmaForConditionalGeneration.from_pretrained(merged_dir).eval()
    base = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    moved = (merged.state_dict()[name] - base.state_dict()[name]).abs().max()
    assert moved > 1e-3  # the adapter was not a no-op, so the comparison below could fail
    with_adapter = PeftModel.from_pretrained(base, os.path.join(lora_run, "final")).eval()
    processor = flow.load_processor(merged_dir)
    test = flow.load_splits(small_export, "extract data in JSON format")["test"]
    batch = [test[i] for i in range(4)]
    expected = flow.generate_batch(with_adapter, processor, batch, flow.GenerationSettings(torch.float32, 30))
    assert flow.generate_batch(merged, processor, batch, flow.GenerationSettings(torch.float32, 30)) == expected

    # Its card: final/'s, for full weights, loading as written without peft.
    card = open(os.path.join(merged_dir, "README.md"), encoding="utf-8").read()
    header = card_header(card)
    assert header["library_name"] == "transformers" and "merged" in header["tags"] and "base_model" not in header
    assert f"A LoRA adapter merged into `{demo_assets[1]}`" in card and "peft" not in card.split("```python")[1]
    assert_card_figures_match(card, json.load(open(os.path.join(lora_run, "metrics.json"))))
    schema = open(os.path.join(lora_run, "final", "schema.json")).read()
    assert open(os.path.join(merged_dir, "schema.json")).read() == schema
    rows = [json.loads(line) for line in open(os.path.join(lora_run, "predictions.jsonl"))]
    assert run_card_code(card, rows[0]["image_path"]) == free_prediction(rows[0])

    again = run_script("--output-dir", lora_run, "--merge")
    assert again.returncode == 0 and "replaced" in again.stdout


def test_merge_refuses_full_weights(demo_run):
    result = run_script("--output-dir", demo_run[0], "--merge")
    assert result.returncode == 2 and "holds full weights, not a LoRA adapter" in result.stderr
