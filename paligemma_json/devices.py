"""What the GPU decides: the one training dtype, one GPU (a whole model copy) per process, and where a
whole copy loaded after training (a merge, the end of an FSDP run) has room.

The training dtype is decided once, here (by cards.py's rule), and the Trainer's `bf16` flag, the
LoRA base's weights, QLoRA's compute dtype and the generation inputs all follow it. Weights are never
fp16: Gemma 2 overflows there.
"""

import functools

import torch
from transformers import TrainingArguments

from paligemma_json import FlowError
from paligemma_json.architecture import architecture
from paligemma_json.cards import has_native_bf16
from paligemma_json.memory import GIB
from paligemma_json.plan import read_launch
# A whole copy's peak over its weights. Measured for a CPU merge (`merge_adapter`, real 3B widths with 4 text
# and 4 vision layers, torch 2.13 CPU; `python benchmarks/merge_memory.py`): anonymous memory peaked at
# 1.05-1.07x the fp32 weights; the bf16 checkpoint mapped from disk came on top as page cache, which the
# kernel reclaims. Rounded up.
WHOLE_COPY_FACTOR = 1.15


def native_bf16() -> bool:
    """By this GPU's compute capability (cards.py's rule). `torch.cuda.is_bf16_supported()` counts
    emulation too, so it says True on a T4 (7.5), where bf16 is slow."""
    return torch.cuda.is_available() and has_native_bf16(torch.cuda.get_device_capability())


def attention_implementation(flex_attention: bool) -> dict | None:
    """FLEX_ATTENTION: Gemma 2's attention through flex_attention, which does its soft-cap and
    PaliGemma's bidirectional prefix (sdpa refuses the soft-cap, FlashAttention the prefix); SigLIP keeps
    sdpa. CUDA only: on a CPU flex_attention has no backward, so the text tower stays eager, said. None:
    transformers' own choice, eager for Gemma 2."""
    if not flex_attention:
        return None
    if not torch.cuda.is_available():
        print("attention: FLEX_ATTENTION is for CUDA (flex_attention has no backward on a CPU): eager here")
        return None
    print("attention: Gemma 2 through flex_attention (FLEX_ATTENTION), SigLIP through sdpa")
    return {"text_config": "flex_attention", "vision_config": "sdpa", "": "eager"}


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
    """One whole copy on this process's device (under a launcher, its local rank's GPU): never split a model
    across GPUs behind DDP's back."""
    if torch.cuda.is_available():
        return {"": read_launch().local_rank}
    return {"": "cpu"}


def available_ram_bytes() -> float | None:
    """What can be allocated without swapping (Linux's MemAvailable, page cache included), or None where
    /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def place_whole_copy(config, dtype: torch.dtype, prefer_gpu: bool, purpose: str, remedy: str) -> dict:
    """The device map for a whole copy of the model `config` describes, in `dtype`: the CPU or this process's
    GPU, the preferred first, whichever has room. Says where before anything loads; where neither has
    room, refuses in one line with what it needs. A GPU is never chosen just because there is one: a
    merge needs none, and on a 12 GB card the 3B's fp32 copy (11.3 GiB) does not fit."""
    needed = WHOLE_COPY_FACTOR * architecture(config).parameters * torch.finfo(dtype).bits / 8
    ram = available_ram_bytes()
    places = [("the CPU", {"": "cpu"}, ram, "RAM: " + ("unknown" if ram is None else f"{ram / GIB:.1f} GiB available"))]
    if torch.cuda.is_available():
        gpu = model_device_map()[""]
        free, _ = torch.cuda.mem_get_info(gpu)
        places.append((f"GPU {gpu}", {"": gpu}, free, f"GPU {gpu}: {free / GIB:.1f} GiB free"))
    if prefer_gpu:
        places.reverse()
    room = "; ".join(place[3] for place in places)
    need = f"about {needed / GIB:.1f} GiB for the model in {str(dtype).removeprefix('torch.')}"
    for name, device_map, free, _ in places:
        if free is None or free >= needed:  # RAM that cannot be read is tried: loading says if it is short
            print(f"{purpose}: on {name}, {need} ({room})")
            return device_map
    raise FlowError(f"{purpose}: {need}, more than is free ({room}); {remedy}")
