"""Past one process: how an FSDP run loads and ends, and validation shared out across processes.

Loading under FSDP. `accelerate launch` with an FSDP config sets `ACCELERATE_USE_FSDP` and
`FSDP_CPU_RAM_EFFICIENT_LOADING` in the environment, and transformers loads FSDP-aware
(`is_fsdp_enabled()`: no device dispatch, and accelerate later shards rank 0's weights onto every
GPU) only when the process group already exists. So it is started here, before the model loads,
the way `TrainingArguments` would start it later, and the model loads onto the CPU rather than
whole onto each GPU.

The end of an FSDP run. Each process holds a slice of every weight, so one process alone can
neither save the model nor generate with it. Every process takes part in putting the whole trained
weights on disk; then the others stop, and the first reloads those weights whole, as a finished
run's `final/` is reloaded, to predict and score the test set. The best checkpoint is on disk whole
already: the Trainer gathers each checkpoint's weights when it saves them (`FULL_STATE_DICT`, which
`prepare_fsdp_loading` insists on). Without one (no evaluation ran), the last weights are gathered
(`torch.distributed.checkpoint`'s full state dict, on the CPU) and written to `final/`.

Validation. Every process generates its share of the validation rows (rows rank, rank + N, ...), and
the rows are gathered to every process in the split's order, so each scores the whole split, as one
process would. Every share has the same length (a short one repeats a row and drops its result), and
sharded generation keeps stepping until every process has finished (`synced_gpus`): under FSDP
each forward step needs every process.
"""

import gc
import math
import os
from datetime import timedelta

import torch

from paligemma_json import FlowError
from paligemma_json.documents import DocumentDataset


def fsdp_launched() -> bool:
    """Started by `accelerate launch` with an FSDP config (on CPUs accelerate then runs DDP instead)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def checkpoint_state_dict_type() -> str:
    """What accelerate will save in each checkpoint; its default is sharded under FSDP2."""
    default = "FULL_STATE_DICT" if os.environ.get("FSDP_VERSION", "1") == "1" else "SHARDED_STATE_DICT"
    return os.environ.get("FSDP_STATE_DICT_TYPE") or default


def prepare_fsdp_loading(use_qlora: bool) -> None:
    """Under FSDP, before the model loads: refuse what cannot end well, then start the process group
    (with the backend the Trainer would choose) so that transformers loads FSDP-aware."""
    if not fsdp_launched():
        return
    if use_qlora:
        raise FlowError("QLoRA under FSDP is not supported here (its 4-bit weights need a float "
                        "bnb_4bit_quant_storage to be sharded): use LoRA (--no-use-qlora) or launch without FSDP")
    if checkpoint_state_dict_type() != "FULL_STATE_DICT":
        raise FlowError(f"FSDP saves {checkpoint_state_dict_type()} checkpoints here, which from_pretrained cannot "
                        "load, so the best checkpoint could not be reloaded: set fsdp_state_dict_type: "
                        "FULL_STATE_DICT in the accelerate config (configs/fsdp.yaml does)")
    from accelerate import PartialState
    from transformers import TrainingArguments
    # The process group as TrainingArguments starts it, which then finds it started and keeps it.
    if torch.cuda.is_available():
        PartialState(timeout=timedelta(seconds=TrainingArguments.ddp_timeout))
    else:
        PartialState(cpu=True)


def loading_device_map(whole_copy_map: dict) -> dict | None:
    """Under FSDP, none: the weights load onto the CPU, and accelerate shards them onto the GPUs."""
    return None if fsdp_launched() else whole_copy_map


def is_sharded(model) -> bool:
    """Whether FSDP (fully_shard, or the older wrapper) holds this model's weights in slices."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


def gather_whole_weights(model, adapters_only: bool) -> dict:
    """Every process must call this. The first gets the whole weights on the CPU; the others {}.
    `adapters_only`: the trained weights alone (a LoRA adapter), not the frozen base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapters_only)
    return get_model_state_dict(model, options=options)


def save_whole_weights(model, best_checkpoint: str | None, final_dir: str, save_final, writes: bool) -> str:
    """The end of an FSDP run, called by every process: returns where the whole weights to use are.
    `save_final(model, state_dict=...)` writes `final_dir` from gathered weights (the process that `writes`)."""
    if best_checkpoint is not None:
        if writes:
            print(f"fsdp: the best checkpoint, {best_checkpoint}, holds the whole weights; reloading it whole")
        return best_checkpoint
    from torch.distributed.fsdp import FullyShardedDataParallel
    unwrapped = model.module if isinstance(model, FullyShardedDataParallel) else model  # fully_shard wraps nothing
    weights = gather_whole_weights(model, adapters_only=hasattr(unwrapped, "peft_config"))
    if writes:
        save_final(unwrapped, state_dict=weights)
        print(f"fsdp: no evaluation chose a checkpoint; the last weights, gathered from every process, "
              f"are in {final_dir}")
    torch.distributed.barrier()  # the others stop only once the weights are on disk
    return final_dir


def release_training_memory(trainer) -> None:
    """The optimizer state and gradients, before the first process loads a whole copy beside its slice."""
    for parameter in trainer.model.parameters():
        parameter.grad = None
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.accelerator.free_memory()  # its references to them; also collects garbage and empties the CUDA cache
    gc.collect()


def synced_generation(model) -> bool:
    """Sharded generation must step on until every process has finished: each step needs them all.
    transformers sees this by itself only for models it sharded on loading."""
    return is_sharded(model) and torch.distributed.get_world_size() > 1


class DatasetShare(DocumentDataset):
    """Some rows of a dataset, in the same shape."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self.entries = [dataset.entries[index] for index in indices]
        self.image_directory_path = dataset.image_directory_path

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def predict_across_processes(predict, dataset, rank: int, count: int) -> list[dict]:
    """`predict(rows)` (an iterable of prediction rows for a dataset) run by each of `count` processes on
    its share of `dataset`; every process gets all the rows, in the dataset's order."""
    if count == 1:
        return list(predict(dataset))
    share = list(range(rank, len(dataset), count))
    padded = share + [rank % len(dataset)] * (math.ceil(len(dataset) / count) - len(share))
    rows = list(predict(DatasetShare(dataset, padded)))[:len(share)]
    shares = [None] * count
    torch.distributed.all_gather_object(shares, rows)
    return [shares[index % count][index // count] for index in range(len(dataset))]


def end_distributed() -> None:
    """Under DDP: without this, about 1 run in 8 aborted at exit here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
