"""What is not a step of the flow in `finetune_paligemma2.py`: metrics, evaluation and pictures,
safe file writing, and the offline demo's assets (docs/layout.md lists the modules)."""

import importlib


class FlowError(Exception):
    """A problem the user can fix; the script reports it as one line, never a traceback."""


def import_or_stop(*modules: str, reason: str):
    """The first of `modules`, imported with the rest (submodules it needs); where any cannot load,
    a FlowError of `reason` with `{error}` filled in: what needs it, and how to get it or do without."""
    try:
        return [importlib.import_module(name) for name in modules][0]
    except Exception as error:  # an ImportError, or a library that fails as it loads (bitsandbytes without CUDA)
        raise FlowError(reason.format(error=error)) from None
