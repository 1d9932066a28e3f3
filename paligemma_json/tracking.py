"""Where a run reports, and when it stops: the experiment trackers and the settings of early stopping
(its callback is in training.py, which loads the Trainer: this module stays light, for step 1).

`REPORT_TO` names the experiment trackers the Trainer logs to (TensorBoard, Weights & Biases,
MLflow, Trackio...). A tracker that is not installed is refused when the settings are read, in one
line naming what to install, instead of by the Trainer's own RuntimeError once the model has loaded.
Their keys stay out of the settings and out of print: keys.py.
"""

import logging

from paligemma_json import FlowError

# Each tracker the Trainer knows: transformers' own availability check for it, and what makes it
# available. The keys must stay the Trainer's INTEGRATION_TO_CALLBACK names (a test compares them).
TRACKERS = {
    "azure_ml": ("is_azureml_available", "pip install azureml-core"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "codecarbon": ("is_codecarbon_available", "pip install codecarbon"),
    "comet_ml": ("is_comet_available", "pip install comet-ml and set COMET_API_KEY"),
    "dagshub": ("is_dagshub_available", "pip install dagshub mlflow"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "flyte": ("is_flyte_deck_standard_available", "pip install flytekit flytekitplugins-deck-standard"),
    "kubeflow": ("is_kubeflow_available", "run it in a Kubeflow TrainJob, which sets KUBEFLOW_TRAINER_SERVER_URL"),
    "mlflow": ("is_mlflow_available", "pip install mlflow (and unset DISABLE_MLFLOW_INTEGRATION)"),
    "neptune": ("is_neptune_available", "pip install neptune"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
    "tensorboard": ("is_tensorboard_available", "pip install tensorboard"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "wandb": ("is_wandb_available", "pip install wandb"),
}


def tracker_names(report_to: str | list[str]) -> list[str]:
    """REPORT_TO as names: a list (`--report-to wandb tensorboard`), commas (`wandb,tensorboard`),
    or one string, as a notebook user may write the constant."""
    values = [report_to] if isinstance(report_to, str) else report_to
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return list(dict.fromkeys(names))  # a name given twice would log everything twice


def trackers(report_to: str | list[str]) -> list[str] | str:
    """REPORT_TO as `TrainingArguments(report_to=...)` takes it, once every tracker named is known
    and installed; FlowError otherwise."""
    names = tracker_names(report_to)
    if names in (["none"], ["all"]) or not names:
        return names[0] if names else "none"
    if {"none", "all"} & set(names):
        raise FlowError(f"REPORT_TO: {' '.join(names)}: none and all stand alone; give one of them, or trackers")
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise FlowError(f"REPORT_TO: {', '.join(unknown)} is not a tracker the Trainer knows; give none, all, "
                        f"or any of {', '.join(TRACKERS)}")
    # The checks live beside the Trainer, which brings peft and bitsandbytes in; bitsandbytes warns on
    # every import on a CPU that an optional kernel is missing (step 4 of the script silences it too).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.integrations import integration_utils
    for name in names:
        check, remedy = TRACKERS[name]
        if not getattr(integration_utils, check)():
            raise FlowError(f"REPORT_TO names {name}, which is not available here: {remedy}; or drop it "
                            "from --report-to")
    return names


def check_patience(patience: int) -> None:
    if patience < 0:
        raise FlowError(f"EARLY_STOPPING_PATIENCE is {patience}: give 0 (train to the end) or the number of "
                        "evaluations without a better validation field F1 to stop after")


def check_tracking_settings(report_to: str | list[str], early_stopping_patience: int) -> None:
    """REPORT_TO and EARLY_STOPPING_PATIENCE checked at start, before any data or model loads."""
    trackers(report_to)
    check_patience(early_stopping_patience)
