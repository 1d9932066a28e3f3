"""Will it fit? paligemma_json/memory.py's estimate and advice, on the real 3B and 10B architectures
(meta device: no weights, no download), and the script's check, run before the model loads, with a
stand-in for the card. The coefficients themselves are measured by benchmarks/real_width.py."""

import os
import sys

import pytest
import torch

from helpers import ROOT, run_flow
from paligemma_json import memory
from paligemma_json.architecture import architecture, paligemma2_config
from paligemma_json.memory import (GIB, TrainingSetting, candidates, estimate, fit_report,
                                   lora_parameters, training_setting, weight_bytes)


@pytest.fixture(scope="module")
def arch():
    """The real architectures, by (size, image size)."""
    return {(size, px): architecture(paligemma2_config(size, px)) for size in ("3b", "10b") for px in (224, 448)}


def setting(**changes):
    return TrainingSetting(**{"mode": "lora", "compute": "bf16", "batch_size": 2, **changes})


def test_every_mode_and_dtype_has_measured_coefficients():
    for mode in ("lora", "qlora", "full"):
        for compute in ("bf16", "fp32"):
            values = memory.COEFFICIENTS[(mode, compute)]
            assert values["head"] > 0 and values["text_linear"] > 0 and values["text_quadratic"] > 0


def test_weights_are_counted_per_mode(arch):
    a = arch[("3b", 224)]
    assert a.parameters == pytest.approx(3.03e9, rel=0.01)  # 2.03e9 Gemma 2 + 0.41e9 SigLIP + 0.59e9 embedding
    assert arch[("10b", 224)].parameters == pytest.approx(9.66e9, rel=0.01)  # Gemma 2 9B's 9.24e9 + SigLIP
    adapters = lora_parameters(a, setting())
    assert weight_bytes(a, setting()) == 2 * a.parameters + 4 * adapters  # bf16 base, fp32 adapters
    assert weight_bytes(a, setting(compute="fp32")) == 4 * a.parameters + 4 * adapters  # a T4: about 12 GB
    assert weight_bytes(a, setting(mode="full")) == 4 * a.parameters
    # nf4: 4 bits and an fp32 absmax per 64 weights for every linear but the LM head; the embedding stays bf16.
    qlora = weight_bytes(a, setting(mode="qlora"))
    assert qlora == pytest.approx(0.5625 * a.linear_weights + 2 * (a.parameters - a.linear_weights) + 4 * adapters)
    assert 2.3 * GIB < qlora < 2.6 * GIB  # the bf16 embedding is half of it


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_adapters_are_counted_as_peft_places_them(freeze_vision):
    """The same count as peft's own, with the script's target rule, on a small PaliGemma 2."""
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    import finetune_paligemma2 as flow
    config = paligemma2_config("3b", 224, text_layers=1, vision_layers=1)
    config.text_config.vocab_size, config.text_config.hidden_size = 512, 64  # small enough to build for real
    config.text_config.intermediate_size, config.projection_dim = 128, 64
    config.vision_config.projection_dim = 64
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 2, 1
    config.text_config.head_dim = 32
    model = PaliGemmaForConditionalGeneration(config)
    if freeze_vision:
        flow.freeze_vision_tower(model)
    targets = flow.LORA_TARGET_MODULES
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=flow.lora_target_modules(targets, freeze_vision),
                                                  task_type="CAUSAL_LM"))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(architecture(config), setting(freeze_vision=freeze_vision,
                                                         lora_targets=tuple(targets))) == trained


def test_the_estimate_moves_the_way_memory_does(arch):
    a, wide = arch[("3b", 224)], arch[("3b", 448)]
    base = estimate(a, setting()).total
    assert estimate(a, setting(batch_size=4)).total > base
    assert estimate(wide, setting()).total > base
    assert estimate(a, setting(gradient_checkpointing=True)).activations < estimate(a, setting()).activations
    assert estimate(a, setting(label_only_loss=False)).activations > estimate(a, setting()).activations
    assert estimate(a, setting(freeze_vision=True)).activations < estimate(a, setting()).activations
    assert estimate(a, setting(mode="qlora")).weights < estimate(a, setting()).weights
    full = estimate(a, setting(mode="full"))
    assert full.gradients == 4 * a.parameters and full.optimizer == 8 * a.parameters  # fp32 gradients, AdamW
    assert estimate(arch[("10b", 224)], setting()).total > base


def test_a_3b_lora_at_224_px_fits_an_a100_40gb_as_it_is(arch):
    lines = fit_report(arch[("3b", 224)], setting(), free_bytes=39.5 * GIB, card="NVIDIA A100-SXM4-40GB")
    assert len(lines) == 1 and "against 39.5 GiB free on NVIDIA A100-SXM4-40GB" in lines[0]


def test_the_optimizer_state_counts_toward_what_must_fit(arch):
    """A full fine-tune of the 3B holds two fp32 AdamW moments per weight, ~22 GiB: left out of the
    total, an A100 40GB would be waved through."""
    full = setting(mode="full", batch_size=1)
    guess = estimate(arch[("3b", 224)], full)
    assert guess.allocated == guess.weights + guess.gradients + guess.optimizer + guess.activations
    lines = fit_report(arch[("3b", 224)], full, free_bytes=39.5 * GIB, card="NVIDIA A100-SXM4-40GB")
    assert "it may not fit; the cheapest change that does: --use-lora" in lines[1], lines


def test_a_t4_is_told_the_cheapest_change_that_fits(arch):
    """A T4 trains in fp32 (no native bf16): the 3B's LoRA base alone is ~11 GiB of its 15."""
    t4 = setting(compute="fp32", batch_size=2)
    free = 14.5 * GIB
    for px in (224, 448):
        lines = fit_report(arch[("3b", px)], t4, free_bytes=free, card="Tesla T4")
        assert "may not fit; the cheapest change that does:" in lines[1], lines
        named = lines[1].split("does: ")[1].split(" (est.")[0]
        assert named in ("--gradient-checkpointing", "--use-qlora", "--gradient-checkpointing --batch-size 1 "
                         "--grad-accum 8", "--gradient-checkpointing --batch-size 1 --grad-accum 8 --use-qlora")
        assert "--use-qlora" in lines[2] and lines[-1].endswith("going on anyway: an estimate can be wrong")
        # What it names fits, and nothing cheaper (earlier in the list) does.
        evaluated = [(flags, estimate(arch[("3b", px)], changed).total) for flags, changed in candidates(t4)]
        position = [flags for flags, _ in evaluated].index(named)
        assert evaluated[position][1] <= free
        assert all(total > free for _, total in evaluated[:position])


def test_the_10b_on_an_l4_and_on_a_shared_t4(arch):
    """10B LoRA at 448 px: an L4 is told a change. A full fine-tune on a T4 is told to take QLoRA with
    everything else; on a T4 another process half fills, nothing tried fits and it says so."""
    l4 = fit_report(arch[("10b", 448)], setting(), free_bytes=22.0 * GIB, card="NVIDIA L4")
    assert "cheapest change that does" in l4[1]
    full = setting(compute="fp32", mode="full")
    t4 = fit_report(arch[("10b", 448)], full, free_bytes=14.5 * GIB, card="Tesla T4")
    assert "does: --gradient-checkpointing --batch-size 1 --grad-accum 8 --use-qlora" in t4[1]
    shared = fit_report(arch[("10b", 448)], full, free_bytes=7.5 * GIB, card="Tesla T4")
    assert "no change tried here fits either" in shared[1]


def test_the_estimate_tables_read_each_cards_size_and_dtype_from_the_card_table():
    """benchmarks/real_width.py's columns: a T4 is judged on the fp32 estimate, the rest on bf16's,
    each against its total less the CUDA context."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from real_width import fits
    row = ("3b", 224, "lora", False, 1, 14.0, 14.6, "fit")  # GiB: bf16 fits a T4's 15, fp32 does not
    assert fits(row) == {"T4": False, "L4": True, "A100 40GB": True, "A100 80GB": True, "H100 80GB": True}
    assert fits(("3b", 224, "lora", False, 1, 79.2, 90.0, "fit")) == {
        "T4": False, "L4": False, "A100 40GB": False, "A100 80GB": True, "H100 80GB": False}  # 79.6 GiB less 0.5


def test_candidates_come_cheapest_first():
    flags = [flags for flags, _ in candidates(setting(mode="full"))]
    assert flags[:5] == ["--gradient-checkpointing", "--batch-size 1 --grad-accum 8", "--use-lora", "--use-qlora",
                         "--freeze-vision"]
    assert flags[5:] == ["--gradient-checkpointing --batch-size 1 --grad-accum 8",
                         "--gradient-checkpointing --batch-size 1 --grad-accum 8 --use-lora",
                         "--gradient-checkpointing --batch-size 1 --grad-accum 8 --use-qlora",
                         "--gradient-checkpointing --batch-size 1 --grad-accum 8 --use-qlora --freeze-vision"]
    smaller = dict(candidates(setting()))["--batch-size 1 --grad-accum 8"]
    assert (smaller.batch_size, smaller.grad_accum) == (1, 8)  # the effective batch stays 2 x 4
    assert candidates(setting(mode="qlora", gradient_checkpointing=True, batch_size=1, freeze_vision=True)) == []


def stand_in_t4(monkeypatch, events: list, free_gib: float = 14.5) -> None:
    """A T4 with `free_gib` of its 15 GiB free, whose every model id resolves to the real 3B-448 config;
    `events` records each free-memory read and each config read's `local_files_only`."""
    import transformers

    def config(cls, *args, local_files_only=False, **kwargs):
        events.append(f"config, cache only: {local_files_only}")
        return paligemma2_config("3b", 448)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: events.append("free memory") or
                        (int(free_gib * GIB), 15 * GIB))
    monkeypatch.setattr(transformers.PaliGemmaConfig, "from_pretrained", classmethod(config))


RUN = {"USE_LORA": True, "USE_QLORA": False, "FREEZE_VISION": True, "LORA_RANK": 16,
       "LORA_TARGET_MODULES": ["q_proj", "v_proj"], "BATCH_SIZE": 2, "GRAD_ACCUM": 4, "GRADIENT_CHECKPOINTING": True,
       "MAX_NEW_TOKENS": 150}


def test_training_setting_reads_the_scripts_settings():
    assert training_setting(RUN, torch.bfloat16) == TrainingSetting(
        mode="lora", compute="bf16", batch_size=2, grad_accum=4, gradient_checkpointing=True, freeze_vision=True,
        label_tokens=150, lora_rank=16, lora_targets=("q_proj", "v_proj"))
    assert training_setting({**RUN, "USE_QLORA": True}, torch.bfloat16).mode == "qlora"  # LoRA on a 4-bit base
    assert training_setting({**RUN, "USE_LORA": False}, torch.bfloat16).mode == "full"
    assert training_setting(RUN, torch.float32).compute == "fp32"


def test_the_script_checks_before_the_model_loads(monkeypatch, capsys, demo_assets, small_export, tmp_path):
    """The script on a stand-in T4 whose model id resolves to the real 3B-448 config: the check
    reads the card's free memory and prints its advice before anything loads a model."""
    import transformers

    events = []

    class Stop(Exception):
        pass

    def model_load(*args, **kwargs):
        events.append("model load")
        raise Stop

    stand_in_t4(monkeypatch, events)
    monkeypatch.setattr(transformers.PaliGemmaForConditionalGeneration, "from_pretrained", model_load)
    with pytest.raises(Stop):
        run_flow(monkeypatch, "--dataset-dir", small_export, "--model-id", demo_assets[1], "--output-dir",
                 str(tmp_path / "out"), "--max-new-tokens", "150", "--no-dataset-report")
    printed = capsys.readouterr().out
    assert [event for event in events if not event.startswith("config")] == ["free memory", "model load"]
    assert "memory: estimated peak" in printed and "GiB free on Tesla T4" in printed
    assert "the cheapest change that does: --gradient-checkpointing" in printed


def test_the_check_counts_what_another_process_holds(monkeypatch, capsys):
    """Judged against the card's free memory, not its size: with 4 of 15 GiB free, a setting that fits
    an empty T4 does not."""
    for free, fits in ((14.5, True), (4.0, False)):
        stand_in_t4(monkeypatch, [], free_gib=free)
        memory.check_fit("any/model", training_setting(RUN, torch.bfloat16))
        printed = capsys.readouterr().out
        assert f"against {free:.1f} GiB free on Tesla T4" in printed
        assert "on an H200 the measured peak ran 4% below to 9% above such estimates" in printed  # reserved's
        assert ("may not fit" not in printed) == fits, printed


def test_the_check_stays_quiet_without_a_gpu_and_skips_an_unreadable_config(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    memory.check_fit("google/paligemma2-3b-pt-224", training_setting(RUN, torch.bfloat16))
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    memory.check_fit("no-such/model", training_setting(RUN, torch.bfloat16), cache_only=True)
    assert capsys.readouterr().out.startswith("memory: check skipped, no config for no-such/model")


def stand_in_card(monkeypatch, name: str, total_gib: float, capability: tuple, px: int = 448) -> None:
    """A card of `total_gib` whose every model id resolves to the real 3B config at `px`."""
    import transformers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Properties", (), {"total_memory": int(total_gib * GIB)})())
    monkeypatch.setattr(transformers.PaliGemmaConfig, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: paligemma2_config("3b", px)))


@pytest.mark.parametrize("card, total_gib, capability, dtype", [
    ("Tesla T4", 15.0, (7, 5), torch.float32), ("NVIDIA A100-SXM4-40GB", 39.4, (8, 0), torch.bfloat16),
    ("NVIDIA H100 80GB HBM3", 79.2, (9, 0), torch.bfloat16)])
def test_batch_size_0_takes_the_largest_that_fits_and_keeps_the_effective_batch(monkeypatch, capsys, card,
                                                                                total_gib, capability, dtype):
    """The 3B at 448 px under LoRA, the label-only loss, 150 label tokens: the chosen micro-batch times its
    accumulation is 2 x GRAD_ACCUM; its estimate with the margin fits the card less the CUDA context, and
    the next larger divisor's does not."""
    stand_in_card(monkeypatch, card, total_gib, capability)
    run = {**RUN, "BATCH_SIZE": 0, "FREEZE_VISION": False, "GRADIENT_CHECKPOINTING": False,
           "LORA_TARGET_MODULES": ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
           "LORA_RANK": 8}
    chosen = memory.largest_fitting_batch("any/model", run, dtype)
    assert chosen["BATCH_SIZE"] * chosen["GRAD_ACCUM"] == 8
    usable = total_gib * GIB - memory.CUDA_CONTEXT_BYTES
    arch = architecture(paligemma2_config("3b", 448))

    def needs(size):
        return estimate(arch, training_setting({**run, "BATCH_SIZE": size, "GRAD_ACCUM": 8 // size}, dtype)).total * 1.1
    larger = [size for size in (1, 2, 4, 8) if size > chosen["BATCH_SIZE"]]
    assert chosen["BATCH_SIZE"] == 1 or needs(chosen["BATCH_SIZE"]) <= usable
    assert not larger or needs(larger[0]) > usable
    assert f"batch: {chosen['BATCH_SIZE']} x accumulation {chosen['GRAD_ACCUM']} = 8" in capsys.readouterr().out
    if card.startswith("NVIDIA H100"):
        assert chosen["BATCH_SIZE"] >= 4  # docs/gpu-memory.md: more than 2 images a step fit an 80 GB card
    if card == "Tesla T4":
        assert chosen["BATCH_SIZE"] == 1  # fp32 at 448 px: not even 2 fit 15 GiB


def test_batch_size_0_is_2_on_a_cpu_said(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.largest_fitting_batch("any/model", {**RUN, "BATCH_SIZE": 0, "GRAD_ACCUM": 3}, torch.float32) == {
        "BATCH_SIZE": 2, "GRAD_ACCUM": 3}
    assert capsys.readouterr().out == ("batch: BATCH_SIZE 0 is 2 on a CPU, where no card bounds it: "
                                       "2 x accumulation 3 = 6\n")


def test_the_script_resolves_batch_size_0_before_the_fit_check_and_the_model(monkeypatch, capsys, demo_assets,
                                                                             small_export, tmp_path):
    """On a stand-in H100 with the real 3B-448 config: step 4 picks the batch, then the fit check
    estimates that batch, then the model loads."""
    import transformers
    from transformers import Trainer, TrainingArguments  # noqa: F401  imported before CUDA is stood in for

    import finetune_paligemma2  # noqa: F401

    class Stop(Exception):
        pass
    stand_in_card(monkeypatch, "NVIDIA H100 80GB HBM3", 79.2, (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(78 * GIB), int(79.2 * GIB)))
    monkeypatch.setattr(transformers.PaliGemmaForConditionalGeneration, "from_pretrained",
                        lambda *args, **kwargs: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        run_flow(monkeypatch, "--dataset-dir", small_export, "--model-id", demo_assets[1], "--output-dir",
                 str(tmp_path / "out"), "--max-new-tokens", "150", "--no-dataset-report", "--batch-size", "0")
    printed = capsys.readouterr().out
    assert "effective batch: 8 (BATCH_SIZE 0, counted as 2 x GRAD_ACCUM 4 x 1 process)" in printed
    picked = printed.index("batch: 4 x accumulation 2 = 8, the largest that fits")
    assert picked < printed.index("memory: estimated peak") and "for LoRA, bf16, batch 4," in printed
