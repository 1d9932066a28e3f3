"""Run by tests/test_fsdp.py under `torchrun --nproc-per-node 2` with accelerate's FSDP variables:
fsdp_trainer_driver.py SCRIPT ARGS...  runs the script as `python SCRIPT ARGS` would, with FSDP on CPUs.

A test-only patch, never used by the script: accelerate turns FSDP on only for GPU-like device
types and quietly runs multi-process DDP on CPUs (`MULTI_CPU`). Here its state reports FSDP when
it was given an FSDP plugin on CPUs, so the Trainer's own FSDP2 path runs on gloo: accelerate's
`fully_shard` wrapping and cpu-RAM-efficient loading, its checkpoint saves (`get_state_dict`), and
the script's end. Each process also prints whether transformers loaded the model FSDP-aware.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from transformers import PaliGemmaForConditionalGeneration

original_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.__dict__.get("distributed_type") == DistributedType.MULTI_CPU:
        self.__dict__["fsdp_on_cpu"] = True
        self.fsdp_plugin = fsdp_plugin


def distributed_type(self):  # a property: accelerate reads and rewrites the shared state in several places
    stored = self.__dict__.get("distributed_type")
    return DistributedType.FSDP if self.__dict__.get("fsdp_on_cpu") and stored == DistributedType.MULTI_CPU else stored


def set_distributed_type(self, value):
    self.__dict__["distributed_type"] = value


AcceleratorState.__init__ = init_with_fsdp_on_cpu
AcceleratorState.distributed_type = property(distributed_type, set_distributed_type)

original_from_pretrained = PaliGemmaForConditionalGeneration.from_pretrained.__func__


def reporting_from_pretrained(cls, *args, **kwargs):
    from transformers.integrations import is_fsdp_enabled
    print(f"fsdp-aware loading: {is_fsdp_enabled()}, device_map {kwargs.get('device_map')}", flush=True)
    PaliGemmaForConditionalGeneration.from_pretrained = classmethod(original_from_pretrained)  # the first load only
    return original_from_pretrained(cls, *args, **kwargs)


PaliGemmaForConditionalGeneration.from_pretrained = classmethod(reporting_from_pretrained)
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
