"""How a run is planned before anything loads: which mode it is, which process writes, what a
`--resume` continues, which flags clash, and the rules for an OUTPUT_DIR that already holds a run.
`RUN_OUTPUTS`, the one list of what a run writes there, drives all three: what counts as an earlier
run, what `--overwrite` removes, and what a resume with other decoding settings predicts again."""

import atexit
import os
import re
import shutil
from dataclasses import dataclass

from paligemma_json import FlowError
from paligemma_json.confidence import RECORD_NAME as CONFIDENCE_RECORD
from paligemma_json.confidence import VALIDATION_PREDICTIONS, check_confidence_settings
from paligemma_json.tracking import check_tracking_settings

CHECKPOINT = "checkpoint-*"  # every checkpoint the Trainer keeps
REVIEW_PAGES = "review-*.html"  # every page of a review too long for one (review.PAGE_NAME)

# Everything a run writes into OUTPUT_DIR, by its role:
# - "trained": the training's results; a new run with other settings would be mixed with them;
# - "predicted": made from the test (and validation) predictions; a resume whose decoding settings
#   differ makes them again, and they too mark a folder as holding a run;
# - "marks": no result, but a folder that holds them was used by a run (logs, the demo's assets);
# - "derived": the rest; none of them alone marks a folder as holding a run.
RUN_OUTPUTS = {
    CHECKPOINT: "trained",
    "final": "trained",
    "predictions.jsonl": "predicted",
    VALIDATION_PREDICTIONS: "predicted",  # decoded once to pick the confidence threshold
    "metrics.json": "predicted",
    os.path.join("final", CONFIDENCE_RECORD): "predicted",  # the threshold picked on those validation rows
    "runs": "marks",  # TensorBoard
    "demo-dataset": "marks",
    "demo-model": "marks",
    "schema.json": "derived",
    "held_out.json": "derived",  # the validation and test photos' hashes, for --predict's marks
    "demo-new-pages": "marks",  # unlabelled pages the demo writes to try --predict on
    "dataset_report.json": "derived",
    "run_settings.json": "derived",
    "training_curves.png": "derived",
    "predictions.png": "derived",
    "report.html": "derived",
    "predict.jsonl": "derived",  # --predict
    "predict.jsonl.partial": "derived",  # a --predict's rows so far, which --predict --resume continues
    "review.html": "derived",  # --predict's page (or index of pages) for checking and correcting it
    REVIEW_PAGES: "derived",  # review.html's pages, for more than one page of documents
    "merged": "derived",  # --merge
    "decoding.jsonl": "derived",  # each decoding's path and cost; a later --predict appends its own lines
}


def outputs_with(*roles: str) -> list[str]:
    return [name for name, role in RUN_OUTPUTS.items() if role in roles]


def present(output_dir: str, names: list[str]) -> list[str]:
    """Which of `names` are in `output_dir`, in their order; the checkpoint and review-page patterns
    stand for every checkpoint and page."""
    if not os.path.isdir(output_dir):
        return []
    checkpoints = sorted(name for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", name))
    pages = sorted(name for name in os.listdir(output_dir) if re.fullmatch(r"review-\d{3,}\.html", name))
    return [found for name in names for found in (
        checkpoints if name == CHECKPOINT else pages if name == REVIEW_PAGES
        else [name] if os.path.exists(os.path.join(output_dir, name)) else [])]


def earlier_run_outputs(output_dir: str) -> list[str]:
    """What an earlier run left in `output_dir` that a new one must not be mixed with; the user's own
    files there are never listed."""
    at_the_top = present(output_dir, outputs_with("trained", "predicted", "marks"))
    return sorted(name for name in at_the_top if os.sep not in name)


def holds_results(output_dir: str) -> bool:
    """Anything a run with other settings would be mixed with."""
    return bool(present(output_dir, outputs_with("trained", "predicted")))


def prepare_output_dir(output_dir: str, overwrite: bool, resume: bool, demo: bool, reads: tuple = ()) -> None:
    """Refuse to mix a new run with a finished or cut-off one, unless asked to continue or replace
    it. A demo's output is disposable, so a demo replaces an earlier demo without being asked.
    Replacing removes every output of the earlier run (and what a cut-off write left half done), so
    nothing of it is left beside the new one; never a file the new run `reads` (its dataset, model, schema)."""
    earlier = earlier_run_outputs(output_dir)
    if not earlier or resume:
        return
    earlier_demo = "demo-model" in earlier  # --overwrite removes it: a real run there is never taken for a demo
    if not (overwrite or (demo and earlier_demo)):
        raise FlowError(f"{output_dir} already holds a run ({', '.join(earlier[:3])}): pass --resume to "
                        "continue it, --overwrite to replace it, or choose another --output-dir")
    doomed = present(output_dir, [name + end for name in RUN_OUTPUTS for end in ("", ".tmp")])
    for read in reads:
        inside = os.path.relpath(os.path.abspath(read), os.path.abspath(output_dir)).split(os.sep)[0]
        if inside in doomed:
            raise FlowError(f"{read}: this run reads it, and replacing the run in {output_dir} would remove it; "
                            "move it out of the folder, or choose another --output-dir")
    print(f"replacing the earlier {'demo ' if earlier_demo else ''}run in {output_dir}")
    for name in doomed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):  # not already gone with the folder that held it
            os.remove(path)


def make_output_dir(output_dir: str) -> list[str]:
    """Creates `output_dir` and any folder above it that is missing; returns those it created,
    the deepest first, so that only they are ever removed again."""
    created, path = [], os.path.abspath(output_dir)
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(output_dir, exist_ok=True)
    return created


def remove_if_left_empty(created: list[str]) -> None:
    """At exit: the folders this run created and wrote nothing into, so a run that stopped before
    it started leaves no empty OUTPUT_DIR behind. A folder that holds anything stays, and so does
    every folder above it."""
    for path in created:
        try:
            os.rmdir(path)  # only ever succeeds on an empty folder
        except OSError:
            return


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint: the Trainer writes `trainer_state.json` last."""
    steps = [int(name.split("-")[1]) for name in present(output_dir, [CHECKPOINT])
             if os.path.isfile(os.path.join(output_dir, name, "trainer_state.json"))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def trained_run(output_dir: str) -> str:
    """The `final/` of the finished run that --predict and --merge use."""
    final_dir = os.path.join(output_dir, "final")
    if not os.path.isdir(final_dir):
        raise FlowError(f"{final_dir}: no trained model; point --output-dir at a finished run")
    return final_dir


@dataclass(frozen=True)
class Launch:
    """This process among those a launcher started: read once, from the variables torchrun and
    `accelerate launch` set (plain `python` is process 0 of 1)."""
    rank: int = 0  # among every process; the first alone writes the run's files
    local_rank: int = 0  # among this machine's processes: the GPU it uses
    processes: int = 1

    @property
    def writes(self) -> bool:
        return self.rank == 0


def read_launch() -> Launch:
    return Launch(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                  int(os.environ.get("WORLD_SIZE", "1")))


@dataclass(frozen=True)
class RunPlan:
    mode: str  # "train" (and test), or one that uses a finished run: "evaluate", "predict", "merge"
    output_dir: str
    launch: Launch  # under torchrun or `accelerate launch` every process runs the script
    resume: bool
    overwrite: bool
    demo: bool
    training_done: bool  # a resumed run whose final/ exists: only predictions are missing
    resume_checkpoint: str | None  # where a resumed training goes on from; None starts it afresh
    effective_batch: int  # images per optimizer step, over every process: what the learning rate is tuned to
    reads: tuple  # the user's inputs (dataset, model, schema), which replacing an earlier run must not remove

    @property
    def processes(self) -> int:
        return self.launch.processes

    @property
    def writes(self) -> bool:
        """The first process alone writes the run's files."""
        return self.launch.writes

    def prepare_output_dir(self) -> None:
        """A training run's folder, by the rules above; the modes that use a finished run write beside it.
        A folder it creates is removed at exit if the run wrote nothing into it (a broken dataset, say)."""
        if self.mode == "train" and self.writes:
            prepare_output_dir(self.output_dir, self.overwrite, self.resume, self.demo, self.reads)
            atexit.register(remove_if_left_empty, make_output_dir(self.output_dir))


def corrections_paths(setting) -> list[str]:
    """CORRECTIONS as a list of files and folders: one path written as a string (in a notebook) is a list of one."""
    return [setting] if isinstance(setting, str) else list(setting)


def run_mode(evaluate: str, predict: str, merge: bool) -> str:
    chosen = [mode for mode, given in (("evaluate", evaluate), ("predict", predict), ("merge", merge)) if given]
    if len(chosen) > 1:
        raise FlowError(f"--{' and --'.join(chosen)} are separate runs: pass one of them at a time")
    return chosen[0] if chosen else "train"


def plan_run(settings: dict) -> RunPlan:
    """The plan for the script's settings, once every flag that could clash or fail late is checked;
    it changes nothing on disk (RunPlan.prepare_output_dir does)."""
    output_dir, resume, demo = settings["OUTPUT_DIR"], settings["RESUME"], settings["DEMO"]
    mode = run_mode(settings["EVALUATE"], settings["PREDICT"], settings["MERGE"])
    if resume and settings["OVERWRITE"]:
        raise FlowError("--resume continues the run in OUTPUT_DIR and --overwrite replaces it: pass one")
    if resume and mode in ("evaluate", "merge"):
        raise FlowError(f"--resume continues a training run or a cut-off --predict; --{mode} has nothing to "
                        "continue: drop --resume")
    check_confidence_settings(settings["CONFIDENCE_THRESHOLD"], settings["FLAG_WRONG_SHARE"])
    if mode == "train":  # a tracker that is not installed stops the run now, not after the model has loaded
        check_tracking_settings(settings["REPORT_TO"], settings["EARLY_STOPPING_PATIENCE"])
    launch = read_launch()
    if demo and launch.processes > 1:
        raise FlowError("--demo builds its data in one process: run it once without a launcher, then launch "
                        "with --dataset-dir OUTPUT_DIR/demo-dataset --model-id OUTPUT_DIR/demo-model")
    resume_training = resume and mode == "train"  # with --predict it continues that alone (paligemma_json/predict.py)
    if resume_training and not present(output_dir, [CHECKPOINT, "final", "run_settings.json"]):
        raise FlowError(f"{output_dir}: no run of this script to resume there (no run_settings.json, checkpoint or "
                        "final/); check --output-dir, or drop --resume to start a new run")
    training_done = resume_training and os.path.isdir(os.path.join(output_dir, "final"))
    checkpoint = newest_checkpoint(output_dir) if resume_training and not training_done else None
    if resume_training:
        print("resume: " + ("training finished; predicting what is missing" if training_done
                            else f"training from {checkpoint}" if checkpoint
                            else "no checkpoint yet; training from the start"))
    inputs = [] if demo else [settings["DATASET_DIR"], settings["MODEL_ID"]]
    inputs += [settings["SCHEMA"], *corrections_paths(settings["CORRECTIONS"])]
    return RunPlan(mode, output_dir, launch, resume, settings["OVERWRITE"], demo, training_done, checkpoint,
                   (settings["BATCH_SIZE"] or 2) * settings["GRAD_ACCUM"] * launch.processes,  # 0: step 4 keeps 2's
                   reads=tuple(path for path in inputs if path))
