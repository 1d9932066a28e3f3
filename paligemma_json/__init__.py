"""What is not a step of the flow in `finetune_paligemma2.py`: metrics, evaluation and pictures,
safe file writing, and the offline demo's assets."""


class FlowError(Exception):
    """A problem the user can fix; the script reports it as one line, never a traceback."""
