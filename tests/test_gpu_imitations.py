"""What a GPU does to the script's tensors, imitated on the CPU, where no test would otherwise see it.

Pinning. On a GPU the Trainer's DataLoader pins every tensor of every batch (`dataloader_pin_memory`),
and `Tensor.pin_memory()` copies into an empty buffer of the same size and strides. A tensor whose
elements share memory (an `expand`ed view, zero stride) cannot be copied into such a buffer: on an
H200 the script crashed at its first training batch that way (shared/GPU-RUNS.md). On a CPU nothing is
pinned, so here the same copy stands in for `pin_memory`, and the DataLoader is told an accelerator
is present so that it pins."""

import os

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as pin_batch

import finetune_paligemma2 as flow
from helpers import build_trainer

MODES = {"lora": (True, False, False), "qlora": (True, True, False), "full": (False, False, False),
         "frozen vision": (True, False, True)}  # (use_lora, use_qlora, freeze_vision)


def imitate_gpu_pinning(monkeypatch) -> list:
    """From here on the DataLoader pins as on a GPU, and pinning is the copy a GPU's makes. Returns
    the list of tensors pinned, so that a test can see that pinning happened at all."""
    pinned = []

    def pin_like_a_gpu(tensor, device=None):
        copy = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype).copy_(tensor)
        pinned.append(copy)
        return copy
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_like_a_gpu)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    return pinned


@pytest.fixture
def gpu_pinning(monkeypatch):
    return imitate_gpu_pinning(monkeypatch)


def test_the_imitation_fails_as_a_gpu_does(gpu_pinning):
    """The stand-in raises the H200's error on a zero-stride view, and copies an ordinary tensor."""
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        torch.arange(4).expand(2, -1).pin_memory()
    assert torch.equal(torch.arange(4).repeat(2, 1).pin_memory(), torch.arange(4).repeat(2, 1))


def test_training_pins_its_batches_on_a_gpu(monkeypatch, tmp_path):
    """What makes the imitation below matter: on a GPU the script's arguments ask for pinning."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flow, "OneGPUPerProcessArguments", lambda **kwargs: kwargs)  # no CUDA to set up here
    assert flow.training_arguments(str(tmp_path), flow.GenerationSettings(torch.float32, 8),
                                   flow.DEFAULTS)["dataloader_pin_memory"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_every_training_and_evaluation_batch_survives_pinning(demo_assets, processor, splits, tmp_path, mode, dtype,
                                                               monkeypatch):
    """Each mode's Trainer, its own DataLoaders (the training batches and the evaluation's loss pass),
    pinned as on a GPU: every tensor of the batch goes through the copy."""
    use_lora, use_qlora, freeze_vision = MODES[mode]
    model = flow.load_model(demo_assets[1], use_lora, use_qlora, freeze_vision, 8, flow.LORA_TARGET_MODULES, dtype)
    generation = flow.GenerationSettings(dtype, 8)
    trainer = build_trainer(flow, model, processor, splits, generation, str(tmp_path), batch_size=4,
                            report_to=["none"])
    trainer.args.dataloader_pin_memory = True  # what a GPU's arguments say (the test above)
    loaders = [trainer.get_train_dataloader(), trainer.get_eval_dataloader()]
    pinned = imitate_gpu_pinning(monkeypatch)  # after the Trainer is built: only the DataLoader sees an accelerator
    for loader in loaders:
        before = len(pinned)
        batch = next(iter(loader))  # raises the GPU's error if any tensor shares memory
        assert {"input_ids", "pixel_values", "labels", "logits_to_keep", "shift_labels"} <= set(batch)
        # accelerate's loader reads one batch ahead, so that one is pinned too
        assert len(pinned) - before >= sum(isinstance(value, torch.Tensor) for value in batch.values())
        assert batch["pixel_values"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_generation_batches_survive_pinning(splits, processor, gpu_pinning, dtype):
    batch = flow.collate_fn([splits["test"][i] for i in range(3)], processor, dtype, with_labels=False)
    pinned = pin_batch(batch)
    assert len(gpu_pinning) == len(batch) and all(torch.equal(pinned[key], batch[key]) for key in batch)


# What the Trainer is given on a GPU with native bf16 (an A100, an H100): bf16 autocast, and the fused
# AdamW (`training_arguments` picks it whenever CUDA is there). Both run on a CPU too, so a resume is
# checked with them here, as shared/DECISIONS.md asks of the optimizer the script ships.

def test_a_gpu_gets_bf16_autocast_and_the_fused_optimizer(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flow, "OneGPUPerProcessArguments", lambda **kwargs: kwargs)
    arguments = flow.training_arguments(str(tmp_path), flow.GenerationSettings(torch.bfloat16, 8), flow.DEFAULTS)
    assert arguments["optim"] == "adamw_torch_fused" and arguments["bf16"]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_with_the_gpus_optimizer_and_autocast_repeats_the_losses(demo_assets, processor, small_export,
                                                                        tmp_path, mode):
    splits = flow.load_splits(small_export, "extract data in JSON format")
    generation = flow.GenerationSettings(torch.bfloat16, 8)
    use_lora = mode == "lora"

    def train(steps, checkpoint=None):
        flow.set_seed(0)  # before the adapters are made, as the script does
        model = flow.load_model(demo_assets[1], use_lora, False, False, 8, flow.LORA_TARGET_MODULES, torch.bfloat16,
                                checkpoint=checkpoint)
        arguments = flow.training_arguments(str(tmp_path), generation, {
            **flow.DEFAULTS, "MAX_STEPS": steps, "SAVE_STEPS": 2, "BATCH_SIZE": 4, "GRAD_ACCUM": 1,
            "LEARNING_RATE": 1e-3, "WARMUP_STEPS": 0, "LOGGING_STEPS": 1, "REPORT_TO": ["none"], "SEED": 0})
        arguments.optim = "adamw_torch_fused"  # as on a GPU (the test above)
        trainer = flow.build_trainer(model, processor, splits["train"], splits["valid"], generation, arguments)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        assert trainer.args.bf16 and trainer.optimizer.optimizer.defaults["fused"]
        losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
        return losses, result.metrics["train_samples_per_second"] * result.metrics["train_runtime"]
    (straight, _), (resumed, samples) = train(4), train(4, checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    assert samples == pytest.approx(2 * 4, rel=0.01)  # this session took steps 3 and 4 alone
    # Step 4's loss follows step 3's update, which AdamW's restored moments shape.
    assert [step for step, _ in resumed] == [1, 2, 3, 4]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight], rel=1e-4)


# --- flex_attention (FLEX_ATTENTION) --------------------------------------------------------------

def test_flex_attention_is_asked_for_on_cuda_only_said_once_each(monkeypatch, capsys):
    from paligemma_json.devices import attention_implementation
    assert attention_implementation(False) is None
    assert attention_implementation(True) is None  # a CPU: eager, said
    assert "FLEX_ATTENTION is for CUDA" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_implementation(True) == {"text_config": "flex_attention", "vision_config": "sdpa", "": "eager"}


@pytest.mark.slow  # flex_attention's kernels compile for minutes on a CPU
def test_flex_attentions_logits_equal_eagers_with_softcap_left_padding_and_the_prefix(demo_assets, processor, splits):
    """What can be checked without a GPU: the forward. The demo's tiny model with Gemma 2's soft-caps
    turned on, low enough (1 and 5, where the 3B has 50 and 30) to bite at its random weights, a
    left-padded batch of three whose image and prompt attend both ways (token_type_ids), loaded with each
    implementation from the same weights. Its backward raises on a CPU ("FlexAttention does not support
    backward on CPU"): loss and gradients are the GPU check's."""
    from transformers import PaliGemmaConfig

    from paligemma_json.training import without_label_only

    config = PaliGemmaConfig.from_pretrained(demo_assets[1])
    config.text_config.attn_logit_softcapping, config.text_config.final_logit_softcapping = 1.0, 5.0
    batch = without_label_only(flow.collate_fn([splits["train"][i] for i in range(3)], processor, torch.float32))
    assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 0).any()  # padded, with a prefix
    logits = {}
    for flex in (False, True):
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: flex)  # attention_implementation's CUDA gate
        implementation = flow.attention_implementation(flex)
        monkeypatch.undo()
        model = flow.PaliGemmaForConditionalGeneration.from_pretrained(
            demo_assets[1], config=config, dtype=torch.float32, attn_implementation=implementation).eval()
        assert model.config.text_config._attn_implementation == ("flex_attention" if flex else "eager")
        with torch.no_grad():
            logits[flex] = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[True][real], logits[False][real], atol=1e-5)
    uncapped = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1], dtype=torch.float32).eval()
    with torch.no_grad():
        assert (uncapped(**batch).logits[real] - logits[False][real]).abs().max() > 1e-2  # the caps bite
