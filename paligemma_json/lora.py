"""LoRA: which modules get adapters. One rule, which the model loading in step 4 hands to peft and
the memory estimate (memory.py) counts adapters by, so the two never disagree."""

import re


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
