"""What a GPU does to the script's tensors, imitated on the CPU, where no test would otherwise see it.

Pinning. On a GPU the Trainer's DataLoader pins every tensor of every batch (`dataloader_pin_memory`),
and `Tensor.pin_memory()` copies into an empty buffer of the same size and strides. A tensor whose
elements share memory (an `expand`ed view, zero stride) cannot be copied into such a buffer: on an
H200 the script crashed at its first training batch that way (shared/GPU-RUNS.md). On a CPU nothing is
pinned, so here the same copy stands in for `pin_memory`, and the DataLoader is told an accelerator
is present so that it pins."""

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as pin_batch

import finetune_paligemma2 as flow
from conftest import build_trainer

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
    assert flow.training_arguments(str(tmp_path), flow.GenerationSettings(torch.float32, 8))["dataloader_pin_memory"]


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
