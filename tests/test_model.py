"""Model loading under each flag combination, collate_fn, a few training steps, and generation."""

import os
import sys

import pytest
import torch

import finetune_paligemma2 as flow
from paligemma_json.json_text import parse_json
from helpers import build_trainer


def load(demo_assets, use_lora=False, use_qlora=False, freeze_vision=False, dtype=torch.float32):
    return flow.load_model(demo_assets[1], use_lora, use_qlora, freeze_vision, 8,
                           flow.LORA_TARGET_MODULES, dtype)


def test_collate_masks_the_prompt_and_ends_labels_with_eos(processor, splits):
    batch = [splits["train"][i] for i in range(3)]
    inputs = flow.collate_fn(batch, processor, torch.float32)
    assert {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels"} <= set(inputs)
    assert all(tensor.device.type == "cpu" for tensor in inputs.values())
    eos = processor.tokenizer.eos_token_id
    for row in range(3):
        labels, types = inputs["labels"][row], inputs["token_type_ids"][row]
        scored = labels != -100
        assert labels[scored][-1] == eos  # or generation never learns to stop
        assert torch.equal(scored, types == 1)  # loss on the suffix only, never on image or prompt
        suffix_ids = processor.tokenizer(batch[row][1]["suffix"])["input_ids"]
        assert labels[scored][:-1].tolist() == suffix_ids  # the whole label, never truncated
    assert inputs["pixel_values"].dtype == torch.float32


def test_collate_without_labels_is_the_generation_prompt(processor, splits):
    inputs = flow.collate_fn([splits["test"][0]], processor, torch.bfloat16, with_labels=False)
    assert "labels" not in inputs and inputs["pixel_values"].dtype == torch.bfloat16
    assert processor.tokenizer.decode(inputs["input_ids"][0, -1:]) == "\n"  # the model answers after it


def lora_module_names(model):
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def trainable_names(model):
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def adapted_modules(model) -> set[str]:
    """The modules that carry a LoRA adapter, named as in the base model."""
    return {name.removeprefix("base_model.model.") for name in lora_module_names(model)}


def targeted_projections(model_dir) -> tuple[set[str], set[str]]:
    """(SigLIP's, Gemma's): every linear layer of the vision tower and of the language model that one of
    the tutorial's target names names, counted layer by layer. SigLIP's attention shares q/k/v_proj's
    names (its output is out_proj, its MLP fc1 and fc2); each Gemma layer has all seven."""
    base = flow.PaliGemmaForConditionalGeneration.from_pretrained(model_dir)
    linears = [name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in flow.LORA_TARGET_MODULES]
    vision = {name for name in linears if name.startswith("model.vision_tower.")}
    language = {name for name in linears if name.startswith("model.language_model.")}
    assert len(vision) == 3 * base.config.vision_config.num_hidden_layers
    assert len(language) == 7 * base.config.text_config.num_hidden_layers
    return vision, language


def test_lora_adapts_vision_and_language_like_the_tutorial(demo_assets):
    model = load(demo_assets, use_lora=True)
    names = lora_module_names(model)
    assert any("vision_tower" in name for name in names) and any("language_model" in name for name in names)
    vision, language = targeted_projections(demo_assets[1])
    assert adapted_modules(model) == vision | language  # none elsewhere, none missed


def test_lora_with_frozen_vision_adapts_the_language_model_only(demo_assets):
    model = load(demo_assets, use_lora=True, freeze_vision=True)
    inner = model.get_base_model().model
    for part in (inner.vision_tower, inner.multi_modal_projector):  # SigLIP and the projector: no adapter
        assert not [name for name, module in part.named_modules() if hasattr(module, "lora_A")]
        assert not [name for name, parameter in part.named_parameters() if parameter.requires_grad]
    adapted = {name.rsplit(".", 1)[-1] for name, module in inner.language_model.named_modules()
               if hasattr(module, "lora_A")}
    assert adapted == set(flow.LORA_TARGET_MODULES)  # every target, in the language model
    assert adapted_modules(model) == targeted_projections(demo_assets[1])[1]  # in every layer
    assert all("lora_" in name and "language_model" in name for name in trainable_names(model))


def test_full_fine_tune_with_frozen_vision_trains_only_the_language_model(demo_assets):
    model = load(demo_assets, freeze_vision=True)
    trainable = trainable_names(model)
    assert trainable and not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    assert any("language_model" in name for name in trainable)
    assert flow.count_parameters(model)[0] < flow.count_parameters(load(demo_assets))[0]


def test_full_fine_tune_trains_everything(demo_assets):
    trainable, total = flow.count_parameters(load(demo_assets))
    assert trainable == total


def test_qlora_loads_nf4_layers_with_the_requested_compute_dtype(demo_assets, processor, splits):
    """bf16, not BitsAndBytesConfig's float32 default, so a dropped compute dtype shows (the flow
    picks fp32 on a CPU, but bitsandbytes 0.50 computes 4-bit in bf16 on a CPU too)."""
    import bitsandbytes as bnb
    model = load(demo_assets, use_qlora=True, freeze_vision=True, dtype=torch.bfloat16)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and {m.compute_dtype for m in four_bit} == {torch.bfloat16}
    assert {m.weight.quant_type for m in four_bit} == {"nf4"}
    assert all("lora_" in name for name in trainable_names(model))
    assert adapted_modules(model) == targeted_projections(demo_assets[1])[1]  # the language model's alone
    inputs = flow.collate_fn([splits["train"][0]], processor, torch.bfloat16)
    with torch.no_grad():
        loss = model(**inputs).loss
    assert torch.isfinite(loss)  # it runs, in bf16, on this CPU


def test_qlora_where_bitsandbytes_cannot_load_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(flow.FlowError, match="USE_QLORA needs bitsandbytes, which cannot load here .*--no-use-qlora"):
        flow.quantization_config(flow.torch.float32)


def test_a_few_training_steps_lower_the_loss(demo_assets, processor, splits, tmp_path):
    """Full fine-tune at the demo's rate through the script's own TrainingArguments and Trainer."""
    torch.manual_seed(0)
    model = load(demo_assets)
    generation = flow.GenerationSettings(torch.float32, max_new_tokens=20)
    trainer = build_trainer(flow, model, processor, splits, generation, str(tmp_path), max_steps=12, batch_size=8,
                            grad_accum=1, learning_rate=2e-3, warmup_steps=0, logging_steps=1, save_steps=100)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_batched_generation_equals_one_by_one(demo_run, splits):
    """Left padding: prompts of different lengths in one batch give the texts they give alone."""
    output_dir, result = demo_run
    assert result.returncode == 0, result.stderr[-2000:]
    final = os.path.join(output_dir, "final")
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(final).eval()
    processor = flow.load_processor(final)
    batch = [splits["test"][i] for i in range(4)]
    batch[1] = (batch[1][0], {**batch[1][1], "prefix": "extract"})
    batch[3] = (batch[3][0], {**batch[3][1], "prefix": "extract data in JSON format, please, every field"})
    together = flow.generate_batch(model, processor, batch, flow.GenerationSettings(torch.float32, 60))
    alone = [flow.generate_batch(model, processor, [item], flow.GenerationSettings(torch.float32, 60))[0]
             for item in batch]
    assert [(o["prediction"], o["truncated"]) for o in together] == [(o["prediction"], o["truncated"]) for o in alone]
    for batched, single in zip(together, alone):  # padding moves the logits by rounding only
        assert [f["confidence"] for f in batched["confidence"]] == pytest.approx(
            [f["confidence"] for f in single["confidence"]], abs=1e-3)
    # Decoded without the prompt: the trained prompt's answers start at the JSON, and no answer
    # repeats its prompt (the odd prompts may well get odd answers).
    assert alone[0]["prediction"].startswith("{") and alone[2]["prediction"].startswith("{")
    assert not any(output["prediction"].startswith(item[1]["prefix"]) for output, item in zip(alone, batch))


def test_a_budget_too_small_is_flagged_truncated(demo_run, splits):
    """Under the schema EOS comes only once the JSON is complete, so an answer that was not cut off parses,
    whatever the tiny model's own skill (its free answers end unparsed now and then)."""
    final = os.path.join(demo_run[0], "final")
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(final).eval()
    processor = flow.load_processor(final)
    constraint = flow.build_constraint(flow.read_saved_schema(final), processor, True)
    batch = [splits["test"][i] for i in range(3)]
    short = flow.generate_batch(model, processor, batch, flow.GenerationSettings(torch.float32, 5), constraint)
    assert all(output["truncated"] for output in short)
    full = flow.generate_batch(model, processor, batch, flow.GenerationSettings(torch.float32, 400), constraint)
    assert not any(output["truncated"] for output in full)
    assert all(parse_json(output["prediction"]) is not None for output in full)


def test_qlora_on_a_cpu_decodes_widths_that_are_no_multiple_of_32(demo_assets, processor, splits, tmp_path):
    """SigLIP's MLP is 4304 wide; bitsandbytes' AVX512-BF16 CPU kernel packs 32 rows a block and stopped
    the first evaluation at the real widths ("N must be divisible by block_n")."""
    config = flow.PaliGemmaConfig.from_pretrained(demo_assets[1])
    config.vision_config.intermediate_size = 4304  # SigLIP So400m's own
    flow.PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = flow.load_model(str(tmp_path), True, True, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
    odd = [module for module in model.modules() if type(module).__name__ == "Linear4bit" and
           (module.out_features % 32 or module.in_features % 64)]  # up_proj and down_proj
    assert odd and not any(module.support_avx512bf16_for_cpu for module in odd)
    rows = flow.generate_batch(model.eval(), processor, [splits["test"][0]], flow.GenerationSettings(torch.float32, 4))
    assert len(rows) == 1
