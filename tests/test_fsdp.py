"""FSDP on CPUs, where `accelerate launch` would quietly run DDP instead (slow: python -m pytest -m slow).

Two gloo processes shard the tiny model. `fully_shard` applied directly drives the package's
FSDP pieces without the Trainer; the whole script then runs under the Trainer with accelerate's
FSDP switched on by a test-only patch (tests/fsdp_trainer_driver.py). What this cannot show: NCCL,
GPU memory, bf16 mixed precision, and more than two processes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import finetune_paligemma2 as flow
from helpers import ROOT, SCRIPT, assert_validation_equals_one_process, free_port, short_run_args, trained_start_args

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
# What `accelerate launch --config_file configs/fsdp.yaml` puts in each process's environment.
FSDP_ENVIRONMENT = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Gemma2DecoderLayer,SiglipEncoderLayer", "FSDP_USE_ORIG_PARAMS": "true",
    "ACCELERATE_MIXED_PRECISION": "no",
}


def torchrun(*args, timeout=600):
    """Two processes; a collective that one process never joins shows as the timeout."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={free_port()}", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **FSDP_ENVIRONMENT, "OMP_NUM_THREADS": "1"}, timeout=timeout)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_sharded_model_ends_in_a_final_folder_that_generates_like_it(mode, demo_run, small_export, tmp_path):
    """From the demo's trained model, so that the generations differ from row to row."""
    result = torchrun(os.path.join(HERE, "fsdp_shard_driver.py"), mode, os.path.join(demo_run[0], "final"),
                      small_export, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.load(open(tmp_path / f"rank-{rank}.json")) for rank in (0, 1))
    for record in (first, second):  # loaded FSDP-aware: process group first, onto the CPU, then sharded
        assert record["fsdp_aware_loading"] is True and record["device_map"] == "None" and record["sharded"]
    images = [json.loads(line)["image"] for line in open(os.path.join(small_export, "valid", "annotations.jsonl"))][:7]
    assert first["predicted_here"] == images[0::2]  # each process its share; the short one padded
    assert second["predicted_here"][:3] == images[1::2] and len(second["predicted_here"]) == 4
    assert [row["image"] for row in first["rows"]] == images and first["rows"] == second["rows"]
    # final/ holds the trained weights, reloads whole, and generates what the sharded model did.
    assert first["weights_dir"] == str(tmp_path / "final") and not first["whole_is_sharded"]
    assert first["reloaded_names"] == first["trained_names"] and first["max_difference"] == 0.0
    assert first["moved"] > 1e-5  # training moved them, so the comparison could fail
    assert os.path.isfile(tmp_path / "final" / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors"))
    assert len({row["prediction"] for row in first["rows"]}) > 2  # generations that tell rows apart
    assert first["whole_rows"] == first["rows"]


def trainer_under_fsdp(script_args, output_dir):
    result = torchrun(os.path.join(HERE, "fsdp_trainer_driver.py"), SCRIPT, *script_args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    checkpoint = output_dir / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # the Trainer's FSDP save ran: it was sharded
    assert result.stdout.count("fsdp-aware loading: True, device_map None") == 2
    assert "fsdp: the best checkpoint, " + str(checkpoint) + ", holds the whole weights" in result.stdout
    return result


def test_the_trainer_under_fsdp_ends_with_final_predictions_and_scores_lora(demo_assets, small_export, tmp_path):
    """The default mode, whose end failed under FSDP: the adapter of the best checkpoint in final/."""
    output_dir = tmp_path / "lora"
    trainer_under_fsdp(short_run_args(small_export, demo_assets[1], output_dir, "--use-lora", "--epochs", "1",
                                      "--max-steps", "-1", "--learning-rate", "1e-2"), output_dir)
    from safetensors.torch import load_file
    final = load_file(output_dir / "final" / "adapter_model.safetensors")
    best = load_file(output_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert final.keys() == best.keys() and all(torch.equal(final[key], best[key]) for key in final)
    assert max(tensor.abs().max().item() for key, tensor in final.items() if "lora_B" in key) > 1e-3
    rows = [json.loads(line) for line in open(output_dir / "predictions.jsonl")]
    assert len(rows) == 8 and os.path.isfile(output_dir / "metrics.json")


def test_the_trainer_under_fsdp_validates_like_one_process(demo_run, small_export, tmp_path):
    """A full fine-tune from the demo's trained model: the sharded validation (each process its
    rows, stepping together) logs what one process scores from that checkpoint, and final/ is it."""
    output_dir = tmp_path / "full"
    trainer_under_fsdp(trained_start_args(demo_run, small_export, output_dir), output_dir)
    assert_validation_equals_one_process(output_dir, small_export)
    final = flow.PaliGemmaForConditionalGeneration.from_pretrained(output_dir / "final").state_dict()
    best = flow.PaliGemmaForConditionalGeneration.from_pretrained(output_dir / "checkpoint-4").state_dict()
    assert all(torch.equal(final[key], best[key]) for key in best)
    assert len(open(output_dir / "predictions.jsonl").readlines()) == 8
