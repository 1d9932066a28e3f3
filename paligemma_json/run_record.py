"""`OUTPUT_DIR/run_settings.json`: the settings a run was made with, so that `--resume` never mixes
two runs. A resume whose settings would change the training is refused while training is not
finished; one whose settings would change the predictions re-predicts every test row."""

import hashlib
import json
import os

from paligemma_json import FlowError
from paligemma_json.files import read_saved_json, write_json_atomically
from paligemma_json.plan import RunPlan, corrections_paths, holds_results, outputs_with, present

RECORD_NAME = "run_settings.json"

# What shapes the trained weights and the checkpoint kept as best. MAX_NEW_TOKENS and NUM_BEAMS are
# here too: validation generates with them, and its field F1 chooses the best checkpoint.
# SAVE_STEPS sets where validation runs, so it also decides which checkpoint is kept.
TRAINING = ("MODEL_ID", "PROMPT", "TRAIN_DATA", "CORRECTIONS", "USE_LORA", "USE_QLORA", "FREEZE_VISION", "LORA_RANK",
            "LORA_TARGET_MODULES", "LEARNING_RATE", "EFFECTIVE_BATCH", "EPOCHS", "MAX_STEPS", "LR_SCHEDULER",
            "WARMUP_STEPS", "WEIGHT_DECAY", "SEED", "SAVE_STEPS", "EARLY_STOPPING_PATIENCE", "MAX_NEW_TOKENS",
            "NUM_BEAMS")
# What changes a test prediction once `final/` exists. USE_QLORA: an adapter is then applied to a
# 4-bit base.
PREDICTION = ("MODEL_ID", "PROMPT", "USE_QLORA", "MAX_NEW_TOKENS", "NUM_BEAMS", "CONSTRAINED", "SCHEMA")

DESCRIBED = {"EFFECTIVE_BATCH": "the effective batch (BATCH_SIZE x GRAD_ACCUM x processes)",
             "TRAIN_DATA": "the train/valid rows (a hash of their images and labels)",
             "CORRECTIONS": "the review exports trained on (as given)",
             "SCHEMA": "the labels' schema (a hash)"}


def short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def model_name(model_id: str, output_dir: str) -> str:
    """A model inside OUTPUT_DIR (the demo's) by its place there, so a moved run still matches; any
    other local folder by its absolute path, however it was spelt; a Hub id as it is."""
    if not os.path.isdir(model_id):
        return model_id
    if os.path.abspath(model_id).startswith(os.path.abspath(output_dir) + os.sep):
        return os.path.join("OUTPUT_DIR", os.path.relpath(model_id, output_dir))
    return os.path.abspath(model_id)


def run_settings(settings: dict, schema: dict | None, splits: dict, effective_batch: int) -> dict:
    """The record's two parts from the script's settings. Left out: MAX_NEW_TOKENS while it is still
    0 (resolved from the labels in step 4), settings that do nothing in this mode, and settings
    this version lacks."""
    rows = [(entry["image"], entry["suffix"]) for split in ("train", "valid") for entry in splits[split].entries]
    values = {name: settings[name] for name in TRAINING + PREDICTION if name in settings}
    # The review exports as given (files or folders), beside TRAIN_DATA, the hash their rows enter.
    values["CORRECTIONS"] = corrections_paths(settings.get("CORRECTIONS") or [])
    values.update(MODEL_ID=model_name(settings["MODEL_ID"], settings["OUTPUT_DIR"]), TRAIN_DATA=short_hash(rows),
                  SCHEMA=short_hash(schema), EFFECTIVE_BATCH=effective_batch)
    ignored = ["LORA_RANK", "LORA_TARGET_MODULES"] if not values["USE_LORA"] else []  # a full fine-tune has no adapter
    ignored += ["EPOCHS"] if values["MAX_STEPS"] > 0 else []  # the Trainer stops at MAX_STEPS then
    ignored += ["MAX_NEW_TOKENS"] if values["MAX_NEW_TOKENS"] <= 0 else []
    for name in ignored:
        del values[name]
    values = json.loads(json.dumps(values))  # as it reads back: tuples become lists
    return {part: {name: values[name] for name in names if name in values}
            for part, names in (("training", TRAINING), ("prediction", PREDICTION))}


def differences(earlier: dict, now: dict) -> list[str]:
    return [f"{DESCRIBED.get(name, name)} was {earlier[name]!r}, now {now[name]!r}"
            for name in now if name in earlier and earlier[name] != now[name]]


def read_record(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, RECORD_NAME)
    try:
        record = read_saved_json(path)
        return None if record is None else {"training": dict(record["training"]), "prediction": dict(record["prediction"])}
    except (ValueError, KeyError, TypeError):
        raise FlowError(f"{path} cannot be read: restore it, or delete it to resume without the check") from None


def check_run_settings(settings: dict, run: RunPlan, schema: dict | None, splits: dict) -> None:
    """Called with the script's settings once MAX_NEW_TOKENS is resolved (step 4), before the model
    loads. Refuses a resume that would mix two trainings, re-predicts when the predictions would be
    mixed, and writes the record (the first process alone)."""
    output_dir, now = run.output_dir, run_settings(settings, schema, splits, run.effective_batch)
    resumes_results = run.resume and holds_results(output_dir)
    earlier = read_record(output_dir) if resumes_results else None
    if earlier is not None:
        refuse_mixed_training(output_dir, earlier, now, run.training_done)
    writes = run.writes
    if resumes_results and earlier is None and writes:
        print(f"note: {output_dir} has no {RECORD_NAME} (an older version made it): its settings cannot be "
              "checked against these; they are recorded from now on")
    if earlier is not None and run.training_done:
        unused = differences(earlier["training"], {name: value for name, value in now["training"].items()
                                                   if name not in now["prediction"]})
        if unused and writes:
            print("note: training is finished, so these change nothing: " + "; ".join(unused))
        now["training"] = earlier["training"]  # what trained final/
    if earlier is not None and writes:
        repredict_if_changed(output_dir, differences(earlier["prediction"], now["prediction"]))
    if writes:  # after any removal: a record never vouches for rows it did not make
        write_json_atomically(now, os.path.join(output_dir, RECORD_NAME))


def refuse_mixed_training(output_dir: str, earlier: dict, now: dict, training_done: bool) -> None:
    changed = (differences(earlier["training"], {"MODEL_ID": now["training"]["MODEL_ID"]}) if training_done
               else differences(earlier["training"], now["training"]))
    if changed:
        why = ("final/ was trained from the earlier model" if training_done
               else "training is not finished and would mix two trainings")
        raise FlowError(f"--resume with other settings than the run in {output_dir}: {'; '.join(changed)} ({why}); "
                        "restore the run's settings, or pass --overwrite to start again, or choose another --output-dir")


def repredict_if_changed(output_dir: str, changed: list[str]) -> None:
    """Predictions from other decoding settings are not kept beside new ones: they and what was
    derived from them go, and step 8 predicts every row again (the validation rows too, when the
    confidence threshold is picked on them)."""
    derived = [os.path.join(output_dir, name) for name in present(output_dir, outputs_with("predicted"))]
    if not changed or not derived:
        return
    print("resume: re-predicting every row, since " + "; ".join(changed) + "; removed "
          + ", ".join(os.path.relpath(path, output_dir) for path in derived))
    for path in derived:
        os.remove(path)
