"""Constants, flags, the demo's overrides, and what the script does with an existing OUTPUT_DIR."""

import os
import shutil
import sys

import pytest

import finetune_paligemma2 as flow
from paligemma_json.demo import demo_paths
from paligemma_json.plan import make_output_dir, newest_checkpoint, plan_run, prepare_output_dir, remove_if_left_empty
from paligemma_json.settings import parse_overrides, resolve_settings, settings_line
from helpers import run_flow, run_script


def resolve(argv):
    return resolve_settings(argv, flow.DEFAULTS, flow.__file__)


def parse(argv):
    return parse_overrides(argv, flow.DEFAULTS, flow.__file__)


def test_flags_override_constants_with_their_types():
    given = parse(["--epochs", "3", "--learning-rate", "1e-4", "--no-use-lora",
                   "--lora-target-modules", "q_proj", "v_proj", "--model-id", "x/y"])
    assert given == {"EPOCHS": 3, "LEARNING_RATE": 1e-4, "USE_LORA": False,
                     "LORA_TARGET_MODULES": ["q_proj", "v_proj"], "MODEL_ID": "x/y"}


HELP_HINT = " (python finetune_paligemma2.py --help lists every flag)"


@pytest.mark.parametrize("argv, reason", [
    (["--epoch", "3"], "unknown flag --epoch; did you mean --epochs?"),
    (["--lora_rank", "4"], "unknown flag --lora_rank; did you mean --lora-rank?"),
    (["--no-use-lor"], "unknown flag --no-use-lor; did you mean --no-use-lora?"),
    (["--learning-rat=1e-4"], "unknown flag --learning-rat; did you mean --learning-rate?"),
    (["--unknown"], "unknown flag --unknown"),
    (["--epochs", "three"], "argument --epochs: invalid float value: 'three'"),
    (["--use-lora", "False"], "unexpected value 'False': a flag is --name value, and a yes/no one takes none: "
                              "--use-lora or --no-use-lora"),
])
def test_unknown_flags_and_wrong_types_are_refused_in_one_line(argv, reason, capsys):
    """The error alone, first and in one line, with the closest flag: argparse's own way put the whole
    usage (dozens of lines) above it."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {reason}{HELP_HINT}\n"


def test_a_misspelt_flag_stops_the_script_in_one_line():
    result = run_script("--learning-rat", "1e-4")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: unknown flag --learning-rat; did you mean --learning-rate?{HELP_HINT}\n"


def test_help_lists_every_constant_and_the_fixed_flag_names():
    result = run_script("--help")
    assert result.returncode == 0
    for flag in ["--model-id", "--dataset-dir", "--output-dir", "--epochs", "--max-steps", "--save-steps",
                 "--demo", "--use-lora", "--use-qlora", "--freeze-vision", "--max-new-tokens", "--num-beams"]:
        assert flag in result.stdout
    assert "the tutorial's 256 cut manifests off" in " ".join(result.stdout.split())  # the why, from the constant's comment
    # The README's commands close it, each on its own line as written, not run together by the wrapping.
    lines = result.stdout.splitlines()
    examples = lines[lines.index("examples:") + 1:]
    for command in ["--demo", "--model-id google/paligemma2-3b-pt-448 --output-dir runs/pallet-448",
                    "--output-dir runs/pallet-448 --predict path/to/photos/", "--output-dir runs/pallet-448 --merge",
                    "--evaluate runs/pallet-448/predictions.jsonl"]:
        assert f"  python finetune_paligemma2.py {command}" in examples


def test_demo_overrides_apply_and_explicit_flags_win():
    from paligemma_json.demo import DEMO_OVERRIDES
    settings = resolve(["--demo", "--max-steps", "7"])
    assert settings["MAX_STEPS"] == 7
    assert settings["USE_LORA"] is False and settings["LEARNING_RATE"] == DEMO_OVERRIDES["LEARNING_RATE"]
    assert resolve([]) == flow.DEFAULTS


def test_the_settings_line_shows_only_what_differs_from_the_defaults():
    assert settings_line(flow.DEFAULTS, flow.DEFAULTS) == "settings: the defaults (--help lists them)"
    changed = {**flow.DEFAULTS, "LEARNING_RATE": 1e-4, "REPORT_TO": ["wandb"], "EPOCHS": 20}  # 20 is the default's 20.0
    assert settings_line(changed, flow.DEFAULTS) == ("settings: LEARNING_RATE=0.0001, REPORT_TO=['wandb'], "
                                                     "and the defaults for the rest (--help lists them)")
    demo = settings_line(resolve(["--demo", "--max-steps", "7", "--output-dir", "demo-out"]), flow.DEFAULTS)
    parts = demo.removeprefix("settings: ").split(", ")
    assert {"DEMO=True", "MAX_STEPS=7", "USE_LORA=False", "LEARNING_RATE=0.002", "OUTPUT_DIR=demo-out",
            f"MODEL_ID={demo_paths('demo-out')[1]}"} <= set(parts)
    assert "PROMPT=" not in demo and "ROBOFLOW" not in demo  # the demo's prompt is the default one
    assert len(demo) < 400  # the whole set was ~960 characters


def test_step_1_prints_the_settings_line(monkeypatch, tmp_path, capsys):
    """The script's own line, printed before a refused OUTPUT_DIR stops it."""
    output_dir = finished_run(tmp_path)
    with pytest.raises(flow.FlowError):
        run_flow(monkeypatch, "--output-dir", output_dir, "--learning-rate", "1e-4")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("settings: ")]
    assert printed == [f"settings: LEARNING_RATE=0.0001, OUTPUT_DIR={output_dir}, and the defaults for the rest "
                       "(--help lists them)"]


def test_qlora_implies_lora():
    assert resolve(["--use-qlora", "--no-use-lora"])["USE_LORA"] is True


def test_notebook_kernel_arguments_are_ignored(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert resolve(["-f", "/root/.local/share/jupyter/runtime/kernel-1.json"]) == flow.DEFAULTS


def finished_run(tmp_path, demo=False):
    output_dir = tmp_path / "run"
    (output_dir / "final").mkdir(parents=True)
    (output_dir / "metrics.json").write_text("{}")
    (output_dir / "checkpoint-10").mkdir()
    (output_dir / "notes.txt").write_text("the user's own file")
    if demo:
        (output_dir / "demo-model").mkdir()
    return str(output_dir)


def assert_refused_and_kept(output_dir: str, demo: bool) -> None:
    """A run without --overwrite meets a finished run's final/: refused, and final/ still there."""
    with pytest.raises(flow.FlowError, match="already holds a run .*--overwrite"):
        prepare_output_dir(output_dir, overwrite=False, resume=False, demo=demo)
    assert os.path.isdir(os.path.join(output_dir, "final"))


def test_a_finished_run_is_refused_without_overwrite(tmp_path):
    assert_refused_and_kept(finished_run(tmp_path), demo=False)


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path):
    output_dir = finished_run(tmp_path)
    prepare_output_dir(output_dir, overwrite=True, resume=False, demo=False)
    assert sorted(os.listdir(output_dir)) == ["notes.txt"]


def test_overwrite_removes_every_output_of_the_run_it_replaces(run, tmp_path):
    """Everything the shared demo run wrote, with what --predict and --merge add beside it: after
    --overwrite only the user's own file is left, so no old merged/ or schema sits beside the new run."""
    old = tmp_path / "old"
    shutil.copytree(run[0], old)
    (old / "predict.jsonl").write_text("{}\n")
    (old / "predict.jsonl.partial").mkdir()  # a cut-off --predict's rows
    (old / "merged").mkdir()
    (old / "final.tmp").mkdir()  # a write the earlier run was cut off in
    (old / "notes.txt").write_text("the user's own file")
    written = set(os.listdir(old))
    assert {"final", "schema.json", "dataset_report.json", "run_settings.json", "report.html", "predictions.png",
            "training_curves.png", "validation_predictions.jsonl", "runs"} <= written  # what there is to remove
    prepare_output_dir(str(old), overwrite=True, resume=False, demo=False)
    assert os.listdir(old) == ["notes.txt"]


def test_overwrite_never_removes_what_the_new_run_reads(tmp_path):
    output_dir = finished_run(tmp_path)
    schema = os.path.join(output_dir, "schema.json")  # the earlier run's, now the user's --schema
    open(schema, "w").write("{}")
    reads = plan_run({**flow.DEFAULTS, "OUTPUT_DIR": output_dir, "OVERWRITE": True, "SCHEMA": schema}).reads
    assert reads == (flow.DATASET_DIR, flow.MODEL_ID, schema)
    with pytest.raises(flow.FlowError, match="schema.json: this run reads it, and replacing the run"):
        prepare_output_dir(output_dir, overwrite=True, resume=False, demo=False, reads=reads)
    assert sorted(os.listdir(output_dir)) == ["checkpoint-10", "final", "metrics.json", "notes.txt", "schema.json"]
    demo = {**flow.DEFAULTS, **dict(zip(("DATASET_DIR", "MODEL_ID"), demo_paths(output_dir))), "DEMO": True}
    assert plan_run(demo).reads == ()  # the demo's own assets are rebuilt, not read


def test_the_effective_batch_counts_every_process(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert plan_run({**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path), "BATCH_SIZE": 3, "GRAD_ACCUM": 5}).effective_batch == 30


def test_the_launch_is_read_once_onto_the_plan(monkeypatch, tmp_path):
    """Rank, local rank and process count come from the launcher's variables, and only the first process writes."""
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    run = plan_run({**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path)})
    assert (run.launch.rank, run.launch.local_rank, run.processes, run.writes) == (3, 1, 4, False)
    monkeypatch.setenv("RANK", "0")
    assert plan_run({**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path)}).writes


def test_training_arguments_follow_the_settings_given_not_the_constants_at_import(tmp_path):
    generation = flow.GenerationSettings(flow.torch.float32, 8)
    changed = {**flow.DEFAULTS, "LEARNING_RATE": 0.125, "SAVE_STEPS": 7, "SEED": 11, "REPORT_TO": ["none"]}
    arguments = flow.training_arguments(str(tmp_path), generation, changed)
    assert (arguments.learning_rate, arguments.save_steps, arguments.eval_steps, arguments.seed) == (0.125, 7, 7, 11)
    assert arguments.save_strategy == arguments.eval_strategy == "steps" and arguments.report_to == []
    assert flow.training_arguments(str(tmp_path), generation, flow.DEFAULTS).save_strategy == "epoch"


def test_one_mode_at_a_time():
    assert plan_run(flow.DEFAULTS).mode == "train" and plan_run({**flow.DEFAULTS, "MERGE": True}).mode == "merge"
    with pytest.raises(flow.FlowError, match="--evaluate and --predict are separate runs: pass one"):
        plan_run({**flow.DEFAULTS, "EVALUATE": "predictions.jsonl", "PREDICT": "photos"})


def test_demo_replaces_an_earlier_demo_but_not_a_real_run(tmp_path):
    prepare_output_dir(finished_run(tmp_path / "a", demo=True), overwrite=False, resume=False, demo=True)
    assert sorted(os.listdir(tmp_path / "a" / "run")) == ["notes.txt"]  # the demo rebuilds its assets
    with pytest.raises(flow.FlowError):
        prepare_output_dir(finished_run(tmp_path / "b"), overwrite=False, resume=False, demo=True)


def test_only_the_folders_a_run_created_and_left_empty_are_removed(tmp_path):
    (tmp_path / "mine").mkdir()
    runs, output_dir = tmp_path / "mine" / "runs", tmp_path / "mine" / "runs" / "out"
    created = make_output_dir(str(output_dir))
    assert created == [str(output_dir), str(runs)] and output_dir.is_dir()
    (runs / "notes.txt").write_text("written beside the run")
    remove_if_left_empty(created)
    assert not output_dir.exists() and runs.is_dir()  # a folder that holds anything stays, and those above it
    created = make_output_dir(str(output_dir))
    (output_dir / "schema.json").write_text("{}")  # the run wrote something: it is kept whole
    remove_if_left_empty(created)
    assert (output_dir / "schema.json").is_file()


def test_a_refused_output_dir_stops_the_script_in_one_line(tmp_path):
    output_dir = finished_run(tmp_path)
    result = run_script("--output-dir", output_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {output_dir} already holds a run")


def test_readme_documents_every_constant():
    readme = open(os.path.join(os.path.dirname(flow.__file__), "README.md")).read()
    for name in flow.DEFAULTS:
        assert f"| `{name}` | `--{name.lower().replace('_', '-')}` |" in readme, name


def test_resume_keeps_the_earlier_run(tmp_path):
    output_dir = finished_run(tmp_path)
    prepare_output_dir(output_dir, overwrite=False, resume=True, demo=False)
    assert sorted(os.listdir(output_dir)) == ["checkpoint-10", "final", "metrics.json", "notes.txt"]


@pytest.mark.parametrize("folder", ["empty", "mistyped"])
def test_resume_where_no_run_is_refused_in_one_line(tmp_path, folder):
    """Hours of training from the start on a GPU is no answer to a typo: refused before anything loads."""
    output_dir = tmp_path / folder
    if folder == "empty":
        output_dir.mkdir()
    with pytest.raises(flow.FlowError) as refused:
        plan_run({**flow.DEFAULTS, "OUTPUT_DIR": str(output_dir), "RESUME": True})
    assert str(refused.value) == (f"{output_dir}: no run of this script to resume there (no run_settings.json, "
                                  "checkpoint or final/); check --output-dir, or drop --resume to start a new run")
    assert not output_dir.exists() or not os.listdir(output_dir)


def test_resume_of_a_run_cut_before_its_first_checkpoint_starts_again_saying_so(tmp_path, capsys):
    (tmp_path / "run_settings.json").write_text("{}")
    run = plan_run({**flow.DEFAULTS, "OUTPUT_DIR": str(tmp_path), "RESUME": True})
    assert run.resume_checkpoint is None and not run.training_done
    assert "resume: no checkpoint yet; training from the start" in capsys.readouterr().out


def test_newest_checkpoint_skips_one_cut_off_while_saving(tmp_path):
    for step, complete in [(8, True), (16, True), (24, False)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert newest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-16")
    assert newest_checkpoint(str(tmp_path / "checkpoint-24")) is None


def test_a_demo_never_replaces_a_real_run_that_overwrote_one(tmp_path):
    """demo, then a real run with --overwrite, then demo again: the real run is refused, not deleted."""
    output_dir = finished_run(tmp_path, demo=True)
    prepare_output_dir(output_dir, overwrite=True, resume=False, demo=False)
    assert "demo-model" not in os.listdir(output_dir)
    os.makedirs(os.path.join(output_dir, "final"))  # the real run's result
    assert_refused_and_kept(output_dir, demo=True)


def test_a_multi_line_reason_is_printed_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        flow.report_flow_errors(flow.FlowError, flow.FlowError("bitsandbytes failed:\n  CUDA setup\n  details"), None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: bitsandbytes failed: CUDA setup details\n"
