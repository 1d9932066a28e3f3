"""Past one process and past the test set: DDP over gloo, --predict, --merge, the Hub push's code path."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import finetune_paligemma2 as flow
from paligemma_json.confidence import calibrate
from paligemma_json.json_text import parse_json
from paligemma_json.metrics import compute_metrics
from paligemma_json.schema import with_layout
from conftest import ROOT, SCRIPT, run_flow, run_script, short_run_args
from test_model_card import assert_card_figures_match, card_header, free_prediction, run_card_code


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained_start_args(demo_run, small_export, output_dir):
    """A short full fine-tune that starts from the demo's trained model, so that validation scores
    something above zero and a share of the rows scores differently from the whole split."""
    return short_run_args(small_export, os.path.join(demo_run[0], "final"), output_dir, "--epochs", "1",
                          "--max-steps", "-1", "--learning-rate", "1e-4", "--max-new-tokens", "220")


def assert_validation_equals_one_process(output_dir, small_export, step=4):
    """The field F1 and valid-JSON rate that the launched run logged at `step` are what this one
    process gets from that checkpoint, generating the whole validation split itself."""
    checkpoint = output_dir / f"checkpoint-{step}"
    logged = next(entry for entry in json.load(open(checkpoint / "trainer_state.json"))["log_history"]
                  if "eval_field_f1" in entry and entry["step"] == step)
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(checkpoint).eval()
    valid = flow.load_splits(small_export, "extract data in JSON format")["valid"]
    rows = list(flow.predict_rows(model, flow.load_processor(str(checkpoint)), valid,
                                  flow.GenerationSettings(torch.float32, max_new_tokens=220), with_confidence=False))
    scores = compute_metrics(rows)
    assert 0 < scores["field_f1"] < 1  # not a figure that any share of the rows would also give
    assert (logged["eval_field_f1"], logged["eval_json_valid_rate"]) == (scores["field_f1"], scores["json_valid_rate"])


def test_two_cpu_processes_halve_the_steps_and_predict_each_test_row_once(demo_run, small_export, tmp_path):
    output_dir = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master-port={free_port()}", SCRIPT,
                             *trained_start_args(demo_run, small_export, output_dir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.load(open(output_dir / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4  # 32 rows / (batch 4 × 2 processes); one process takes 8
    assert result.stdout.count("training: 4 steps") == 1  # the second process stops after training
    rows = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    truth = [json.loads(line)["image"] for line in open(os.path.join(small_export, "test", "annotations.jsonl"))]
    assert [row["image"] for row in rows] == truth  # every test row exactly once
    assert "Traceback" not in result.stderr
    # Each process generated half the validation rows; the figures are the whole split's.
    assert_validation_equals_one_process(output_dir, small_export)


def test_the_demo_refuses_a_launcher_in_one_line(tmp_path):
    result = run_script("--demo", "--output-dir", str(tmp_path / "out"), env={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2 and result.stderr.startswith("error: --demo builds its data in one process")


def test_predict_reads_a_folder_or_one_image_with_the_final_model(demo_run):
    output_dir = demo_run[0]
    folder = os.path.join(output_dir, "demo-dataset", "test")
    result = run_script("--output-dir", output_dir, "--predict", folder)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "predict.jsonl"))]
    images = sorted(name for name in os.listdir(folder) if name.endswith(".jpg"))
    assert [row["image"] for row in rows] == images
    assert set(rows[0]) == {"image", "image_path", "prefix", "prediction", "truncated", "confidence", "parsed"}
    assert all(0 <= field["confidence"] <= 1 for row in rows for field in row["confidence"])
    assert sum(len(row["confidence"]) for row in rows) >= 24 * 10  # a confidence for every field
    assert sum(row["parsed"] for row in rows) >= 0.8 * len(rows)
    assert all(row["parsed"] == (parse_json(row["prediction"]) is not None) for row in rows)
    assert f"predicted: 24 images, {sum(row['parsed'] for row in rows)} parsed as JSON" in result.stdout
    # The threshold picked on validation and saved with the model (tests/test_confidence.py), not 0.8.
    chosen = json.load(open(os.path.join(output_dir, "final", "confidence.json")))
    assert f"confidence threshold: {chosen['threshold']} (validation), from {output_dir}" in result.stdout
    unsure = sum(field["confidence"] < chosen["threshold"] for row in rows for field in row["confidence"])
    assert f"{unsure} fields below confidence {chosen['threshold']} to check" in result.stdout
    assert all(field["confidence"] == calibrate(field["raw_confidence"], chosen["temperature"])
               for row in rows for field in row["confidence"])  # as the test set was calibrated
    assert not os.path.exists(os.path.join(output_dir, "predict.jsonl.tmp"))

    one = run_script("--output-dir", output_dir, "--predict", os.path.join(folder, images[3]))
    assert one.returncode == 0 and "replaced" in one.stdout
    only = [json.loads(line) for line in open(os.path.join(output_dir, "predict.jsonl"))]
    assert len(only) == 1 and only[0]["prediction"] == rows[3]["prediction"]  # batched equals alone


@pytest.mark.parametrize("target, message", [("missing.jpg", "no such image or folder"), ("", "no images")])
def test_predict_names_what_is_wrong(demo_run, tmp_path, target, message):
    (tmp_path / "empty").mkdir()
    path = str(tmp_path / "empty" / target) if target else str(tmp_path / "empty")
    result = run_script("--output-dir", demo_run[0], "--predict", path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_predict_without_a_trained_model_is_one_line(tmp_path, demo_assets):
    result = run_script("--output-dir", str(tmp_path / "nothing"), "--predict", demo_assets[0])
    assert result.returncode == 2 and "no trained model; point --output-dir at a finished run" in result.stderr


@pytest.fixture(scope="module")
def lora_run(demo_assets, small_export, tmp_path_factory):
    """A short LoRA run whose adapter has moved far from zero (lr 1e-2)."""
    output_dir = tmp_path_factory.mktemp("lora") / "run"
    result = run_script(*short_run_args(small_export, demo_assets[1], output_dir, "--use-lora",
                                        "--learning-rate", "1e-2", "--max-steps", "8", "--save-steps", "4"))
    assert result.returncode == 0, result.stderr[-2000:]
    return str(output_dir)


def test_merge_gives_a_standalone_model_that_generates_like_base_plus_adapter(lora_run, demo_assets, small_export):
    from peft import PeftModel
    result = run_script("--output-dir", lora_run, "--merge")
    assert result.returncode == 0, result.stderr[-2000:]
    merged_dir = os.path.join(lora_run, "merged")
    assert not os.path.isfile(os.path.join(merged_dir, "adapter_config.json"))
    merged = flow.PaliGemmaForConditionalGeneration.from_pretrained(merged_dir).eval()
    base = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    moved = (merged.state_dict()[name] - base.state_dict()[name]).abs().max()
    assert moved > 1e-3  # the adapter was not a no-op, so the comparison below could fail
    with_adapter = PeftModel.from_pretrained(base, os.path.join(lora_run, "final")).eval()
    processor = flow.load_processor(merged_dir)
    test = flow.load_splits(small_export, "extract data in JSON format")["test"]
    batch = [test[i] for i in range(4)]
    expected = flow.generate_batch(with_adapter, processor, batch, flow.GenerationSettings(torch.float32, 30))
    assert flow.generate_batch(merged, processor, batch, flow.GenerationSettings(torch.float32, 30)) == expected

    # Its card: final/'s, for full weights, loading as written without peft.
    card = open(os.path.join(merged_dir, "README.md"), encoding="utf-8").read()
    header = card_header(card)
    assert header["library_name"] == "transformers" and "merged" in header["tags"] and "base_model" not in header
    assert f"A LoRA adapter merged into `{demo_assets[1]}`" in card and "peft" not in card.split("```python")[1]
    assert_card_figures_match(card, json.load(open(os.path.join(lora_run, "metrics.json"))))
    schema = open(os.path.join(lora_run, "final", "schema.json")).read()
    assert open(os.path.join(merged_dir, "schema.json")).read() == schema
    rows = [json.loads(line) for line in open(os.path.join(lora_run, "predictions.jsonl"))]
    assert run_card_code(card, rows[0]["image_path"]) == free_prediction(rows[0])

    again = run_script("--output-dir", lora_run, "--merge")
    assert again.returncode == 0 and "replaced" in again.stdout


def test_the_lora_card_replaces_pefts_and_loads_the_adapter_as_written(lora_run, demo_assets):
    card = open(os.path.join(lora_run, "final", "README.md"), encoding="utf-8").read()
    header = card_header(card)
    assert header["library_name"] == "peft" and "lora" in header["tags"] and header["training_data"] == "local:export"
    assert "base_model" not in header and "license" not in header  # a local base (tests/test_model_card.py)
    assert "[More Information Needed]" not in card  # peft's own template, written with the adapter, is gone
    assert f"A LoRA adapter for `{demo_assets[1]}`" in card and "- Method: LoRA, rank 8, on q_proj, " in card
    assert_card_figures_match(card, json.load(open(os.path.join(lora_run, "metrics.json"))))
    rows = [json.loads(line) for line in open(os.path.join(lora_run, "predictions.jsonl"))]
    assert run_card_code(card, rows[1]["image_path"]) == free_prediction(rows[1])


def test_a_failed_push_after_scoring_loses_only_the_upload(lora_run, demo_assets, small_export, tmp_path, monkeypatch):
    """A copy of the finished LoRA run, resumed in-process without its metrics.json and card: only
    this run's scoring can write them before the push, which sees them and fails."""
    from huggingface_hub import HfApi
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("merged"))
    (run / "metrics.json").unlink()
    (run / "final" / "README.md").unlink()
    weights = (run / "final" / "adapter_model.safetensors").read_bytes()
    seen = {}

    def failing_upload(self, folder_path, repo_id, **kwargs):
        seen.update(card=open(os.path.join(folder_path, "README.md")).read(),
                    metrics=json.load(open(run / "metrics.json")))
        raise ConnectionError("the Hub is unreachable")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", failing_upload)
    with pytest.raises(flow.FlowError) as error:
        run_flow(monkeypatch, *short_run_args(small_export, demo_assets[1], run, "--use-lora", "--learning-rate",
                                              "1e-2", "--max-steps", "8", "--save-steps", "4", "--resume",
                                              "--push-to-hub", "someone/pallet-model"))
    assert_card_figures_match(seen["card"], seen["metrics"])  # pushed after scoring, with the card
    final = str(run / "final")
    assert str(error.value) == (f"pushing {final} to someone/pallet-model failed (ConnectionError); the run's results "
                                "are all written. Check HF_TOKEN and that it may write to someone/pallet-model, then "
                                f"upload again: hf upload someone/pallet-model {final} --private")
    assert json.load(open(run / "metrics.json")) == seen["metrics"]  # nothing but the upload is lost
    assert (run / "final" / "README.md").read_text() == seen["card"]
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == weights
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 8


def test_merge_refuses_full_weights(demo_run):
    result = run_script("--output-dir", demo_run[0], "--merge")
    assert result.returncode == 2 and "holds full weights, not a LoRA adapter" in result.stderr


def test_the_hub_push_code_path_uploads_final_and_passes_no_token(monkeypatch, tmp_path):
    """Only the code path: the Hub cannot be reached here, so the upload itself is untested."""
    from huggingface_hub import HfApi
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *a, **k: calls.append(("upload", a, k)))
    flow.push_to_hub(str(tmp_path), "someone/pallet-model")
    assert [call[0] for call in calls] == ["create", "upload"]
    assert calls[0][1] == ("someone/pallet-model",) and calls[0][2]["private"] is True
    assert calls[1][2]["folder_path"] == str(tmp_path) and calls[1][2]["repo_id"] == "someone/pallet-model"
    assert not any("token" in call[2] for call in calls)


def test_predict_no_constrained_decodes_free(demo_assets, tmp_path, capsys):
    """The untrained tiny model writes `<locNNNN>` tokens left to itself and a small object when
    held to final/schema.json: which of the two `--predict` wrote shows whether it was constrained."""
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1]).eval()
    schema = with_layout({"type": "object", "properties": {"route": {"type": "string", "maxLength": 4}},
                               "required": ["route"], "additionalProperties": False}, ['{"route": "R12"}'])
    flow.save_final_model(model, flow.load_processor(demo_assets[1]), str(tmp_path / "final"), schema)
    source, images = os.path.join(demo_assets[0], "test"), tmp_path / "images"
    names = sorted(name for name in os.listdir(source) if name.endswith(".jpg"))[:3]
    images.mkdir()
    for name in names:
        shutil.copy(os.path.join(source, name), images)
    images = str(images)

    def predict(constrained):
        rows = flow.predict_documents(str(tmp_path), images, "extract data in JSON format",
                                      flow.GenerationSettings(torch.float32, 30, batch_size=3), constrained=constrained,
                                      threshold=0.8)
        return rows, capsys.readouterr().out
    held, printed = predict(True)
    assert "decoding: constrained" in printed and all(row["parsed"] for row in held)
    free, printed = predict(False)
    assert "decoding: free (--no-constrained)" in printed
    assert [row["image"] for row in free] == names and not any(row["parsed"] for row in free)
