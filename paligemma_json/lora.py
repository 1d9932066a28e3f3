"""LoRA: which modules get adapters, and which base model a saved adapter goes on. The target rule is
written once: the model loading in step 4 hands it to peft and the memory estimate (memory.py)
counts adapters by it, so the two never disagree."""

import os
import re

from paligemma_json.files import read_saved_json


def lora_target_modules(names: list[str], freeze_vision: bool) -> list[str] | str:
    """peft's `target_modules` for LORA_TARGET_MODULES. q/k/v_proj also name SigLIP's attention: with
    vision frozen, a regex keeps the adapters in the language model."""
    if freeze_vision:
        return r".*language_model.*\.(" + "|".join(map(re.escape, names)) + r")"
    return list(names)


def is_lora_target(module_name: str, target_modules: list[str] | str) -> bool:
    """peft's rule for `target_modules`: a regex must match the whole module name; each name of a list,
    its last dotted part(s)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return any(module_name == target or module_name.endswith("." + target) for target in target_modules)


def adapter_parameters(lora_shapes, rank: int, targets: list[str], freeze_vision: bool) -> dict[str, int]:
    """LoRA's own parameters per tower, rank x (in + out) for each `(name, in, out)` linear of `lora_shapes`
    (architecture.py) that `targets` adapts as step 4 hands them to peft: what memory.py stores and
    speed.py counts FLOPs for."""
    adapted = lora_target_modules(list(targets), freeze_vision)
    parameters = {"language_model": 0, "vision_tower": 0}
    for name, fan_in, fan_out in lora_shapes:
        if is_lora_target(name, adapted):
            parameters["vision_tower" if "vision_tower" in name else "language_model"] += rank * (fan_in + fan_out)
    return parameters


def adapter_base_source(final_dir: str) -> str:
    """Where a LoRA run's base model is named, for a message about a base that is not there (moved)."""
    return f"base_model_name_or_path in {final_dir}/adapter_config.json"


def adapter_base(final_dir: str) -> str | None:
    """The base model a LoRA adapter was trained on, or None for full weights."""
    config = read_saved_json(os.path.join(final_dir, "adapter_config.json"))
    return None if config is None else config["base_model_name_or_path"]
