"""Writing results so that a crash never leaves a file or folder that looks complete but is not,
and the rules for an OUTPUT_DIR that already holds a run."""

import json
import os
import re
import shutil

from paligemma_json import FlowError


def replace_atomically(write, final_path: str) -> None:
    """`write(temporary_path)`, then rename it onto `final_path`."""
    temporary = final_path + ".tmp"
    if os.path.isdir(temporary):
        shutil.rmtree(temporary)
    write(temporary)
    if os.path.isdir(final_path):
        shutil.rmtree(final_path)  # a folder cannot be renamed onto a non-empty one
    os.replace(temporary, final_path)


def write_json_atomically(data, path: str) -> None:
    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
    replace_atomically(write, path)


def read_saved_json(path: str):
    """What a JSON file the flow saved holds; None when there is none; a ValueError when it is not JSON."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def earlier_run_outputs(output_dir: str) -> list[str]:
    """What an earlier run in `output_dir` wrote; the user's own files there are not listed."""
    if not os.path.isdir(output_dir):
        return []
    return [name for name in sorted(os.listdir(output_dir))
            if name in ("final", "metrics.json", "predictions.jsonl", "validation_predictions.jsonl", "runs",
                        "demo-dataset", "demo-model")
            or name.startswith("checkpoint-")]


def prepare_output_dir(output_dir: str, overwrite: bool, resume: bool, demo: bool) -> None:
    """Refuse to mix a new run with a finished or cut-off one, unless asked to continue or replace
    it. A demo's output is disposable, so a demo replaces an earlier demo without being asked."""
    earlier = earlier_run_outputs(output_dir)
    if not earlier or resume:
        return
    earlier_demo = "demo-model" in earlier  # --overwrite removes it: a real run there is never taken for a demo
    if not (overwrite or (demo and earlier_demo)):
        raise FlowError(f"{output_dir} already holds a run ({', '.join(earlier[:3])}): pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --output-dir")
    print(f"replacing the earlier {'demo ' if earlier_demo else ''}run in {output_dir}")
    for name in earlier:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint: the Trainer writes `trainer_state.json` last."""
    if not os.path.isdir(output_dir):  # a launcher's other processes may look before the first creates it
        return None
    steps = [int(name.split("-")[1]) for name in os.listdir(output_dir)
             if re.fullmatch(r"checkpoint-\d+", name)
             and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json"))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def completed_rows(predictions_path: str, entries: list[dict]) -> list[dict]:
    """The rows of an earlier, cut-off prediction run that match `entries` in order; a line torn by
    the crash ends them."""
    rows = []
    if os.path.isfile(predictions_path):
        with open(predictions_path, "rb") as file:
            for line, entry in zip(file, entries):
                try:
                    row = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n") or row.get("image") != entry["image"]:
                    break
                rows.append(row)
    return rows


def adapter_base(final_dir: str) -> str | None:
    """The base model a LoRA adapter was trained on, or None for full weights."""
    config_path = os.path.join(final_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as config:
        return json.load(config)["base_model_name_or_path"]
