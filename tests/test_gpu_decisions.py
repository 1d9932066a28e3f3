"""What only a GPU decides, checked on the CPU with stand-ins for `torch.cuda`: the one training
dtype, one GPU per process without a launcher, an fp32 merge, and MFU against the card's own peak."""

import functools
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import finetune_paligemma2 as flow
from helpers import build_trainer
from paligemma_json.architecture import paligemma2_3b_config
from paligemma_json.cards import CARDS, find_card, memory_sizes
from paligemma_json.speed import DTYPE_NAMES, mfu, mfu_report, peak_flops, training_rates, training_report
from paligemma_json.training import SessionStart

PROMPT = "extract data in JSON format"
T4, A100, H100 = (7, 5), (8, 0), (9, 0)


def stand_in_gpu(monkeypatch, capability, name="a GPU"):
    """`torch.cuda` as a machine with one such GPU (None: no GPU). torch's own bf16 check counts
    emulation, so it says yes on every GPU: the decision must not ask it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability is not None)


# 1. One dtype decision

@pytest.mark.parametrize("capability, expected", [(None, torch.float32), (T4, torch.float32),
                                                  (A100, torch.bfloat16), (H100, torch.bfloat16)])
def test_native_bf16_is_decided_by_compute_capability(monkeypatch, capsys, capability, expected):
    stand_in_gpu(monkeypatch, capability, "Tesla T4" if capability == T4 else "a GPU")
    assert flow.training_dtype() == expected
    note = capsys.readouterr().out
    if capability == T4:  # the T4 user is told what fp32 costs and what to do
        assert "compute capability 7.5" in note and "12 GB" in note and "--use-qlora" in note
    else:
        assert "no native bf16" not in note


@pytest.mark.parametrize("capability", [T4, A100])
def test_trainer_flag_lora_base_and_qlora_compute_follow_the_decision(monkeypatch, tmp_path, capability):
    stand_in_gpu(monkeypatch, capability)
    dtype = flow.training_dtype()
    loads = []
    monkeypatch.setattr(flow, "hub_load", lambda load, name, **kwargs: loads.append(kwargs) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(flow, "get_peft_model", lambda model, config: model)
    flow.load_model("base", True, False, False, 8, flow.LORA_TARGET_MODULES, dtype)  # LoRA
    flow.load_model("base", True, True, False, 8, flow.LORA_TARGET_MODULES, dtype)  # QLoRA
    assert loads[0]["dtype"] == loads[1]["dtype"] == dtype
    assert loads[1]["quantization_config"].bnb_4bit_compute_dtype == dtype
    monkeypatch.setattr(flow, "OneGPUPerProcessArguments", lambda **kwargs: kwargs)  # no CUDA to set up here
    arguments = flow.training_arguments(str(tmp_path), flow.GenerationSettings(dtype, 8), flow.DEFAULTS)
    assert arguments["bf16"] == (capability == A100)
    assert not arguments.get("fp16")  # Gemma 2 overflows in fp16


# 2. Plain `python` on a machine with two GPUs

@pytest.fixture
def two_gpus_without_launcher(monkeypatch):
    """transformers' device setup as on a machine with two GPUs and no torchrun or accelerate: it
    counts them all as this process's `n_gpu`."""
    real = TrainingArguments.__dict__["_setup_devices"].func

    def setup(self):
        device = real(self)
        self._n_gpu = 2
        return device
    stand_in = functools.cached_property(setup)
    stand_in.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(TrainingArguments, "_setup_devices", stand_in)


def trainer_on_two_gpus(demo_assets, tmp_path, batch_size):
    model = flow.load_model(demo_assets[1], False, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
    splits = flow.load_splits(demo_assets[0], PROMPT)
    generation = flow.GenerationSettings(torch.float32, max_new_tokens=8, batch_size=4)
    return build_trainer(flow, model, flow.load_processor(demo_assets[1]), splits, generation, str(tmp_path),
                         batch_size=batch_size, max_steps=4)


def test_two_gpus_without_a_launcher_train_on_one_and_say_how_to_use_both(two_gpus_without_launcher, demo_assets,
                                                                         tmp_path, capsys):
    trainer = trainer_on_two_gpus(demo_assets, tmp_path, batch_size=3)
    assert trainer.args.n_gpu == 1 and trainer.args.train_batch_size == 3
    assert len(next(iter(trainer.get_train_dataloader()))["input_ids"]) == 3  # the recipe's batch, not 2 x 3
    assert not isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)
    assert "torchrun --nproc_per_node 2" in capsys.readouterr().out


def test_the_stand_in_reproduces_transformers_data_parallel(two_gpus_without_launcher, demo_assets, tmp_path,
                                                            monkeypatch):
    """Without the capped arguments the same stand-in doubles the batch and wraps DataParallel, so the
    test above could fail."""
    monkeypatch.setattr(flow, "OneGPUPerProcessArguments", TrainingArguments)
    trainer = trainer_on_two_gpus(demo_assets, tmp_path, batch_size=3)
    assert trainer.args.train_batch_size == 6
    assert isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)


# 3. --merge on a bf16 GPU

@pytest.fixture(scope="module")
def adapter_run(demo_assets, tmp_path_factory):
    """A run's final/ holding a LoRA adapter whose lora_B is N(0, 1e-3), the size training leaves it,
    on a base whose weights are exact in bf16 (as a bf16 checkpoint's are), so that the merge's
    rounding is the only thing that can differ from base + adapter."""
    from peft import LoraConfig, get_peft_model
    root = tmp_path_factory.mktemp("merge")
    base_dir, final_dir = str(root / "base"), str(root / "run" / "final")
    base = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1], dtype=torch.float32)
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.copy_(parameter.bfloat16().float())
    base.save_pretrained(base_dir)
    processor = flow.load_processor(demo_assets[1])
    processor.save_pretrained(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(flow.PaliGemmaForConditionalGeneration.from_pretrained(base_dir),
                           LoraConfig(r=8, target_modules=flow.LORA_TARGET_MODULES, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1e-3)
    model.save_pretrained(final_dir)
    processor.save_pretrained(final_dir)
    return str(root / "run"), base_dir


def logits(model, demo_assets):
    processor = flow.load_processor(demo_assets[1])
    batch = [flow.load_splits(demo_assets[0], PROMPT)["test"][i] for i in range(2)]
    inputs = flow.collate_fn(batch, processor, torch.float32)
    inputs.pop("labels")
    with torch.no_grad():
        return model.eval()(**inputs).logits.float()


def test_merge_on_a_bf16_gpu_equals_base_plus_adapter_in_fp32(adapter_run, demo_assets, monkeypatch):
    from peft import PeftModel
    run_dir, base_dir = adapter_run
    monkeypatch.setattr(flow, "training_dtype", lambda: torch.bfloat16)  # as on an A100 or H100
    merged_dir = flow.merge_adapter(run_dir)
    base = flow.PaliGemmaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    without_adapter = logits(base, demo_assets)
    expected = logits(PeftModel.from_pretrained(base, os.path.join(run_dir, "final")), demo_assets)
    merged = flow.PaliGemmaForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32)
    error = (logits(merged, demo_assets) - expected).abs().max().item()
    adapter_effect = (expected - without_adapter).abs().max().item()
    assert error < 1e-5 < adapter_effect / 100  # the adapter moves the logits; the merge keeps all of it
    weights = load_file(os.path.join(merged_dir, "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}


def stand_in_memory(monkeypatch, ram_gib: float, gpu_free_gib: float | None) -> None:
    """RAM available and, unless None, one GPU with that much free (an A100's capability)."""
    from paligemma_json import devices
    monkeypatch.setattr(devices, "available_ram_bytes", lambda: ram_gib * devices.GIB)
    stand_in_gpu(monkeypatch, None if gpu_free_gib is None else A100)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu_free_gib * devices.GIB, 80 * devices.GIB))


def test_a_merge_on_a_gpu_machine_runs_on_the_cpu_when_ram_holds_it(adapter_run, monkeypatch, capsys):
    """The merge really runs here, with a stand-in GPU that has room too: loading onto GPU 0 would fail."""
    stand_in_memory(monkeypatch, ram_gib=24, gpu_free_gib=40)
    flow.merge_adapter(adapter_run[0])
    assert "merge: on the CPU, about 0.0 GiB for the model in float32 (RAM: 24.0 GiB available; GPU 0: 40.0 GiB " \
           "free)" in capsys.readouterr().out


@pytest.mark.parametrize("ram, gpu_free, prefer_gpu, expected", [
    (24, 40, False, {"": "cpu"}),  # a merge: RAM first, though the GPU has room
    (11.8, 14.5, False, {"": 0}),  # Colab with a T4: 12.7 GB of RAM do not hold the 3B in fp32
    (11.8, None, False, "merge: about 13.0 GiB for the model in float32, more than is free (RAM: 11.8 GiB"),
    (11.8, 11.0, False, "merge: about 13.0 GiB for the model in float32, more than is free (RAM: 11.8 GiB "
                        "available; GPU 0: 11.0 GiB free); run"),  # a QLoRA user's 12 GB card
    (100, 14.5, True, {"": 0}),  # the end of an FSDP run: the GPU first, to predict on
    (100, 5.0, True, {"": "cpu"})])
def test_a_whole_copy_goes_where_it_fits(monkeypatch, capsys, ram, gpu_free, prefer_gpu, expected):
    """The real 3B (meta device): 3.03e9 parameters, 11.3 GiB in fp32, 13.0 with what loading holds besides."""
    from paligemma_json import FlowError
    stand_in_memory(monkeypatch, ram, gpu_free)

    def place():
        return flow.place_whole_copy(paligemma2_3b_config(224), torch.float32, prefer_gpu, "merge", "run it elsewhere")
    if isinstance(expected, str):
        with pytest.raises(FlowError, match=re.escape(expected)):
            place()
    else:
        assert place() == expected
        where = "the CPU" if expected[""] == "cpu" else "GPU 0"
        printed = capsys.readouterr().out
        assert printed.startswith(f"merge: on {where}, about 13.0 GiB for the model in float32")
        if (ram, gpu_free) == (24, 40):  # docs/using-the-model.md quotes this line
            assert printed == ("merge: on the CPU, about 13.0 GiB for the model in float32 (RAM: 24.0 GiB available; "
                               "GPU 0: 40.0 GiB free)\n")


# 4. MFU against the card's own peak, over this session's steps

@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165e12),
    ("Tesla T4", torch.float32, 8.1e12),  # a T4 trains in fp32 here
    ("Tesla V100-SXM2-16GB", torch.float32, 15.7e12),
    ("Tesla V100S-PCIE-32GB", torch.float32, 16.4e12),
    # Not their namesakes' figures: no MFU rather than a wrong one.
    ("NVIDIA A10G", torch.bfloat16, None),
    ("NVIDIA H200 NVL", torch.bfloat16, None),
    ("NVIDIA L40", torch.bfloat16, None),
    ("Tesla T4", torch.bfloat16, None),  # the peak of the dtype the run trains in, or none
    ("NVIDIA A100-SXM4-80GB", torch.float32, None),
])
def test_the_peak_is_the_cards_own_in_the_training_dtype(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


# Each card's compute capability (NVIDIA's list of CUDA GPUs), from which devices.py decides the dtype.
CAPABILITIES = {"T4": (7, 5), "V100-SXM2": (7, 0), "V100-PCIE": (7, 0), "V100S": (7, 0), "A10": (8, 6),
                "A10G": (8, 6), "L4": (8, 9), "L40S": (8, 9), "RTX 4090": (8, 9), "RTX 4090 D": (8, 9),
                "A100": (8, 0), "H100 80GB HBM3": (9, 0), "H100 SXM": (9, 0), "H100 PCIe": (9, 0),
                "H100 NVL": (9, 0), "H200": (9, 0), "H200 NVL": (9, 0)}


def test_every_card_names_its_training_dtype(monkeypatch):
    """A row's `compute` is the dtype the run decides on that card: MFU's peak and the memory tables'
    rows are in that dtype."""
    assert set(CAPABILITIES) == set(CARDS)  # a new row needs its capability here
    for key, card in CARDS.items():
        assert card.capability == CAPABILITIES[key], key
        stand_in_gpu(monkeypatch, CAPABILITIES[key], key)
        assert DTYPE_NAMES[flow.training_dtype()] == card.compute, key


@pytest.mark.parametrize("device_name, size", [("Tesla T4", "T4"), ("NVIDIA L4", "L4"),
                                               ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
                                               ("NVIDIA A100 80GB PCIe", "A100 80GB"),
                                               ("NVIDIA H100 80GB HBM3", "H100 80GB")])
def test_the_memory_tables_sizes_are_rows_of_the_card_table(device_name, size):
    """One row per card: the size the memory tables name is on the row whose peak MFU uses."""
    assert size in find_card(device_name).memory_mib
    assert (size, find_card(device_name).compute) in [(name, compute) for name, _, compute in memory_sizes()]


def test_mfu_line_uses_the_cards_peak_or_says_why_there_is_none():
    config = paligemma2_3b_config(224)
    on_h100 = mfu(config, 4 * 356, 4, True, False)
    line = mfu_report(config, 4 * 356, 4, True, False, 1, "NVIDIA A100-SXM4-40GB", torch.bfloat16)
    assert f"{on_h100 * 989 / 312:.1%}" in line and "312 TFLOP/s" in line and "bf16" in line  # ~3.2x the H100 figure
    t4 = mfu_report(config, 356, 1, True, False, 1, "Tesla T4", torch.float32)
    assert f"{mfu(config, 356, 1, True, False, peak_flops=8.1e12):.1%}" in t4 and "fp32" in t4
    unknown = mfu_report(config, 356, 1, True, False, 1, "NVIDIA A10G", torch.bfloat16)
    assert unknown.startswith("MFU: not computed") and "NVIDIA A10G" in unknown and "cards.py" in unknown


def test_rates_count_the_same_steps_as_the_time():
    # Resumed at step 8 of 16: 8,000 tokens before, 16,000 at the end; this session ran 10 s, 2 s of
    # it validation, and the Trainer's samples/s is this session's (32 samples over 10 s).
    metrics = {"train_runtime": 10.0, "train_samples_per_second": 3.2, "train_loss": 0.5}
    line, *rates = training_report(metrics, steps=16, tokens=16000 - 8000, evaluation_s=2.0, resumed=True)
    assert rates == pytest.approx((4.0, 1000.0)) and "4.00 samples/s, 1000 tokens/s" in line
    assert "this session's steps alone" in line
    assert training_rates(32, 8000, 10.0, 2.0) == pytest.approx((4.0, 1000.0))


def test_a_resumed_trainer_reports_the_tokens_seen_before_this_session(demo_assets, tmp_path):
    """The Trainer restores num_input_tokens_seen from the checkpoint before on_train_begin."""
    model = flow.load_model(demo_assets[1], False, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
    processor = flow.load_processor(demo_assets[1])
    train = flow.load_splits(demo_assets[0], PROMPT)["train"]

    def run(steps, resume=None):
        session = SessionStart()
        arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                                      save_steps=2, save_strategy="steps", report_to=[], use_cpu=True,
                                      include_num_input_tokens_seen="non_padding", remove_unused_columns=False)
        trainer = Trainer(model=model, args=arguments, train_dataset=train, callbacks=[session],
                          data_collator=functools.partial(flow.collate_fn, processor=processor, dtype=torch.float32))
        trainer.train(resume_from_checkpoint=resume)
        return session.tokens_seen, trainer.state.num_input_tokens_seen
    before_first, after_first = run(2)
    before_second, after_second = run(4, resume=os.path.join(tmp_path, "checkpoint-2"))
    assert before_first == 0 and before_second == after_first > 0
    assert after_second > after_first


def test_a_resume_with_no_step_left_reports_speed_without_dividing_by_zero(demo_assets, small_export, tmp_path):
    """A run killed after its last checkpoint but before final/ is saved: the resumed `train()` takes no
    step, and the Trainer reports 0 samples/s. The MFU line (printed on every GPU) must say so, not fail."""
    model = flow.load_model(demo_assets[1], False, False, False, 8, flow.LORA_TARGET_MODULES, torch.float32)
    processor = flow.load_processor(demo_assets[1])
    splits = flow.load_splits(small_export, PROMPT)
    generation = flow.GenerationSettings(torch.float32, 8)

    def train(resume=None):
        trainer = build_trainer(flow, model, processor, splits, generation, str(tmp_path), max_steps=8, save_steps=8,
                                batch_size=4, grad_accum=1, report_to=["none"])  # one epoch of the 32 rows
        return trainer, trainer.train(resume_from_checkpoint=resume)
    train()
    trainer, result = train(resume=os.path.join(tmp_path, "checkpoint-8"))
    line, samples_per_second, tokens_per_second = trainer.speed(result, resumed=True)
    assert result.metrics["train_samples_per_second"] == 0  # what transformers reports for no step
    assert line == "training: all 8 steps were taken before this resume; none ran in this session"
    mfu_line = mfu_report(model.config, tokens_per_second, samples_per_second, False, False, 1, "NVIDIA H100 80GB HBM3",
                          torch.bfloat16)
    assert mfu_line == "MFU: not computed: no training step ran in this session (it resumed a finished training)"
