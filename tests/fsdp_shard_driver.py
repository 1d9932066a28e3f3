"""Run by tests/test_fsdp.py under `torchrun --nproc-per-node 2` on CPUs (gloo), with accelerate's
FSDP variables in the environment:  fsdp_shard_driver.py lora|full MODEL_DIR DATASET_DIR OUT_DIR

The tiny model loads through the script's `load_model` (FSDP-aware: process group first, no device
map), is sharded with `fully_shard` as accelerate shards it, trains two steps, generates a
validation share through `predict_across_processes`, and ends through `save_whole_weights`, the
path a sharded run takes when no checkpoint was chosen. Every process writes what it saw to
OUT_DIR/rank-N.json; the first also reloads `final/` whole and generates the same rows again.
"""

import functools
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_paligemma2 as flow  # noqa: E402
from paligemma_json import distributed  # noqa: E402

mode, model_dir, dataset_dir, out_dir = sys.argv[1:5]
use_lora = mode == "lora"
record = {}

original_from_pretrained = flow.PaliGemmaForConditionalGeneration.from_pretrained.__func__


def recording_from_pretrained(cls, *args, **kwargs):
    from transformers.integrations import is_fsdp_enabled
    record.update(fsdp_aware_loading=is_fsdp_enabled(), device_map=repr(kwargs.get("device_map")))
    return original_from_pretrained(cls, *args, **kwargs)


flow.PaliGemmaForConditionalGeneration.from_pretrained = classmethod(recording_from_pretrained)
torch.manual_seed(0)
model = flow.load_model(model_dir, use_lora, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
flow.PaliGemmaForConditionalGeneration.from_pretrained = classmethod(original_from_pretrained)
rank = dist.get_rank()

from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # noqa: E402

for module in model.modules():  # accelerate's TRANSFORMER_BASED_WRAP with configs/fsdp.yaml's classes
    if type(module).__name__ in ("Gemma2DecoderLayer", "SiglipEncoderLayer"):
        fully_shard(module)
fully_shard(model)
register_fsdp_forward_method(model, "generate")  # as the Trainer does under FSDP
record["sharded"] = distributed.is_sharded(model)

processor = flow.load_processor(model_dir)
splits = flow.load_splits(dataset_dir, "extract data in JSON format")
initial = {name: parameter.full_tensor().detach().clone() for name, parameter in model.named_parameters()
           if parameter.requires_grad}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3 if use_lora else 1e-4)
model.train()
for step in range(2):  # each process its own rows, as the Trainer's sampler splits them
    first = 8 * step + 4 * rank
    batch = flow.collate_fn([splits["train"][i] for i in range(first, first + 4)], processor, torch.float32)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

# Seven rows over two processes, three a batch: shares of four and three, which would take two
# batches and one, so the short share is padded to four (or the sharded generation would hang).
valid = distributed.DatasetShare(splits["valid"], list(range(7)))
generation = flow.GenerationSettings(torch.float32, max_new_tokens=60, batch_size=3)
predicted_here = []


def predict(dataset):
    predicted_here.extend(entry["image"] for entry in dataset.entries)
    return flow.predict_rows(model, processor, dataset, generation, with_confidence=False)


record["rows"] = distributed.predict_across_processes(predict, valid, rank, dist.get_world_size())
record["predicted_here"] = predicted_here

# The whole trained weights, gathered as a reference: every process takes part in each full_tensor().
trained = {name: parameter.full_tensor().detach().clone() for name, parameter in model.named_parameters()
           if parameter.requires_grad}
final_dir = os.path.join(out_dir, "final")
weights_dir = distributed.save_whole_weights(model, None, final_dir, functools.partial(
    flow.save_final_model, processor=processor, final_dir=final_dir, schema=None), writes=rank == 0)
record["weights_dir"] = weights_dir

if rank == 0:  # the others stop here, as the script's do; this one goes on with a whole copy
    whole = flow.load_trained_model(weights_dir, torch.float32).eval()
    record["whole_is_sharded"] = distributed.is_sharded(whole)
    reloaded = dict(whole.named_parameters())
    if use_lora:  # a PeftModel loaded for inference names its adapter weights as the trained one did
        reloaded = {name: parameter for name, parameter in reloaded.items() if "lora_" in name}
    record["trained_names"] = sorted(trained)
    record["reloaded_names"] = sorted(reloaded)
    record["max_difference"] = max((trained[name] - reloaded[name]).abs().max().item()
                                   for name in trained if name in reloaded)
    record["moved"] = max((trained[name] - initial[name]).abs().max().item() for name in trained)
    record["whole_rows"] = list(flow.predict_rows(whole, processor, valid, generation, with_confidence=False))

with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as out:
    json.dump(record, out)
dist.destroy_process_group()
