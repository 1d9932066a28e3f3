"""What the GPU decides: the one training dtype, and one GPU (a whole model copy) per process.

The training dtype is decided once, here, and the Trainer's `bf16` flag, the LoRA base's weights,
QLoRA's compute dtype and the generation inputs all follow it. Weights are never fp16: Gemma 2
overflows there.
"""

import functools
import os

import torch
from transformers import TrainingArguments


def native_bf16() -> bool:
    """bf16 at full speed starts at compute capability 8.0 (Ampere). `torch.cuda.is_bf16_supported()`
    counts emulation too, so it says True on a T4 (7.5), where bf16 is slow."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def training_dtype() -> torch.dtype:
    if native_bf16():
        return torch.bfloat16
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        # 3.0e9 parameters x 4 bytes; a T4 has 15 GB.
        print(f"note: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no native bf16: "
              "fp32 weights and compute (Gemma 2 overflows in fp16), so a LoRA base of the 3B alone takes about "
              "12 GB; --use-qlora stores it in 4 bits")
    return torch.float32


class OneGPUPerProcessArguments(TrainingArguments):
    """TrainingArguments that never run `nn.DataParallel`. Started with plain `python` on a machine
    with several GPUs, the Trainer counts them all as `n_gpu`: it multiplies the batch by that count
    (fewer, larger optimizer steps than the recipe) and wraps the model in DataParallel, except
    a 4-bit one, whose whole multiplied batch then lands on one card. Capping `n_gpu` where the
    Trainer sets it keeps every reader of it (batch sizes, the DataParallel wrap, the loss
    scaling) on one GPU; under torchrun or accelerate it is 1 already."""

    @functools.cached_property
    def _setup_devices(self) -> torch.device:
        device = super()._setup_devices  # where the Trainer sets _n_gpu, once
        if self._n_gpu > 1:
            print(f"note: {self._n_gpu} GPUs and one process: training on {device} alone; to use all of them, "
                  f"torchrun --nproc_per_node {self._n_gpu} finetune_paligemma2.py ... "
                  f"(or accelerate launch --multi_gpu --num_processes {self._n_gpu} finetune_paligemma2.py ...)")
            self._n_gpu = 1
        return device


def model_device_map() -> dict:
    """One whole copy on this process's device: never split a model across GPUs behind DDP's back."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}
