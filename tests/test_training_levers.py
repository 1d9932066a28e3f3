"""Memory levers of a training step (paligemma_json/training.py): the loss on label positions only,
and gradient checkpointing. Each must give the loss and gradients of the plain step."""

import pytest
import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import IntervalStrategy

import finetune_paligemma2 as flow
from helpers import build_trainer
from paligemma_json.training import (LABEL_ONLY_KEYS, full_logits_loss, label_only_inputs, label_only_loss,
                                     without_label_only)

MODES = {  # name -> (use_lora, use_qlora, freeze_vision)
    "lora": (True, False, False),
    "qlora": (True, True, False),
    "full": (False, False, False),
    "lora_frozen_vision": (True, False, True),
    "full_frozen_vision": (False, False, True),
}


def load(demo_assets, mode: str):
    """The model as the script loads it, seeded; LoRA's B matrices made non-zero, or every A
    matrix would get a zero gradient and a lost gradient could not show."""
    use_lora, use_qlora, freeze_vision = MODES[mode]
    set_seed(0)
    model = flow.load_model(demo_assets[1], use_lora, use_qlora, freeze_vision, 8, flow.LORA_TARGET_MODULES,
                            torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def trained_gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_gradients_equal(expected: dict, actual: dict, rtol: float = 1e-4, atol: float = 1e-7):
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=rtol, atol=atol), name


def short_trainer(model, processor, splits, tmp_path, **changes):
    settings = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "learning_rate": 2e-3, "warmup_steps": 0,
                "logging_steps": 1, "save_steps": 100, **changes}
    trainer = build_trainer(flow, model, processor, splits, flow.GenerationSettings(torch.float32, 20), str(tmp_path),
                            **settings)
    trainer.args.eval_strategy = IntervalStrategy.NO  # in place: dataclasses.replace resets accelerate's state
    trainer.args.save_strategy = IntervalStrategy.NO
    return trainer


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# --- Logits and loss on the label positions only -----------------------------------------------------

def test_collate_keeps_logits_for_the_scored_positions_only(demo_assets, processor, splits):
    batch = flow.collate_fn([splits["train"][i] for i in range(3)], processor, torch.float32)
    labels, positions = batch["labels"], batch["logits_to_keep"]
    scored_per_row = (labels[:, 1:] != -100).sum(dim=1)  # what the shifted loss scores
    assert positions.shape == (3, int(scored_per_row.max()))  # left padding: the longest label, no more
    assert positions.shape[1] < labels.shape[1] - 16  # the 16 image tokens and the prompt are not scored
    assert torch.equal(batch["shift_labels"][batch["shift_labels"] != -100], labels[:, 1:][labels[:, 1:] != -100])
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(demo_assets[1])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == positions.shape  # the output layer ran on the kept positions alone
    generation = flow.collate_fn([splits["test"][0]], processor, torch.float32, with_labels=False)
    assert not set(LABEL_ONLY_KEYS) & set(generation)  # generation's prompt is untouched


def test_label_only_inputs_also_hold_for_right_padding():
    """Correct whatever the padding side; only the saving depends on it."""
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 8, 9, -100, -100, -100]])
    keys = label_only_inputs(labels)
    assert keys["logits_to_keep"].tolist() == [[0, 1, 2, 3]] * 2  # column 0 predicts row 2's first label
    assert keys["shift_labels"].tolist() == [[-100, 5, 6, 7], [8, 9, -100, -100]]
    none = label_only_inputs(torch.full((2, 4), -100))  # nothing scored: one position, a loss of nothing
    assert none["logits_to_keep"].shape == (2, 1) and (none["shift_labels"] == -100).all()


def test_steady_shapes_pad_to_a_few_lengths_with_the_same_loss_and_gradients(demo_assets, processor, splits):
    """COMPILE_TRAINING's padding: every length a multiple of STEADY_MULTIPLE, the label span too, and the
    step's loss and gradients those of the batch padded to its own longest row (padding scores nothing and
    is never attended to)."""
    rows = [splits["train"][i] for i in range(4)]
    plain = flow.collate_fn(rows, processor, torch.float32)
    steady = flow.collate_fn(rows, processor, torch.float32, pad_multiple=flow.STEADY_MULTIPLE)
    assert steady["input_ids"].shape[1] % flow.STEADY_MULTIPLE == 0
    assert steady["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert steady["logits_to_keep"].shape[1] % flow.STEADY_MULTIPLE == 0
    assert torch.equal(steady["labels"][:, -plain["labels"].shape[1]:], plain["labels"])
    results = []
    for batch in (plain, steady):
        model = load(demo_assets, "lora")
        loss = model(**batch).loss
        loss.backward()
        results.append((float(loss.detach()), trained_gradients(model)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert_gradients_equal(results[0][1], results[1][1])
    pairs = [[splits["train"][i], splits["train"][i + 1]] for i in range(0, 40, 2)]
    own = {flow.collate_fn(pair, processor, torch.float32)["input_ids"].shape[1] for pair in pairs}
    padded = {flow.collate_fn(pair, processor, torch.float32, pad_multiple=flow.STEADY_MULTIPLE)["input_ids"].shape[1]
              for pair in pairs}
    assert len(own) > 10 and len(padded) <= 2  # the demo's first 20 batches of two: 14 lengths, then 2


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_label_only_loss_and_gradients_equal_the_full_logits_ones(demo_assets, processor, splits, mode):
    batch = flow.collate_fn([splits["train"][i] for i in range(4)], processor, torch.float32)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    for num_items_in_batch in (None, 3 * scored):  # a mean over this batch; one part of an accumulated batch
        results = []
        for loss_of in (full_logits_loss, label_only_loss):
            model = load(demo_assets, mode)
            loss = loss_of(model, batch, num_items_in_batch)
            loss.backward()
            results.append((float(loss.detach()), trained_gradients(model)))
        (full_loss, full_gradients), (label_loss, label_gradients) = results
        assert label_loss == pytest.approx(full_loss, rel=1e-5)
        assert_gradients_equal(full_gradients, label_gradients)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trainer_with_accumulation_logs_the_full_logits_losses(demo_assets, processor, splits, tmp_path, mode):
    """Three optimizer steps of two accumulated batches each, through the script's Trainer, against
    the same run with logits at every position: the losses (hence the gradients that led to them)
    agree, and so do the Trainer's token count and its validation loss."""
    runs = {}
    for path in ("full_logits", "label_only"):
        trainer = short_trainer(load(demo_assets, mode), processor, splits, tmp_path / path)
        if path == "full_logits":
            collate = trainer.data_collator
            trainer.data_collator = lambda rows: without_label_only(collate(rows))
        trainer.train()
        batch = trainer.data_collator([splits["valid"][i] for i in range(4)])
        runs[path] = (logged_losses(trainer), float(trainer._get_num_items_in_batch([batch], "cpu")),
                      flow.Trainer.evaluate(trainer)["eval_loss"])  # the Trainer's own, without generation
    (full_losses, full_count, full_eval), (label_losses, label_count, label_eval) = runs.values()
    assert len(label_losses) == 3
    assert label_losses == pytest.approx(full_losses, rel=1e-5)
    assert label_count == full_count
    assert label_eval == pytest.approx(full_eval, rel=1e-5)


# --- Gradient checkpointing ----------------------------------------------------------------------

class GradientRecorder(TrainerCallback):
    """The gradients of the first optimizer step, as the optimizer is about to apply them."""

    def __init__(self, model):
        self.model, self.gradients = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradients is None:
            self.gradients = trained_gradients(self.model)


def count_calls(module) -> list[int]:
    calls = [0]
    # A pre-hook: the recompute stops early once the last tensor the backward needs is back (torch's
    # checkpoint early stop), which in SigLIP's layer is inside the MLP, before a forward hook would run.
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def first_mlps(model):
    """Inside the checkpointed layers: the layer's own hooks stay outside the recompute."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.language_model.layers[0].mlp, inner.model.vision_tower.encoder.layers[0].mlp


@pytest.mark.parametrize("mode", list(MODES))
def test_gradient_checkpointing_gives_the_same_step(demo_assets, processor, splits, tmp_path, mode):
    """One optimizer step through the script's Trainer with and without GRADIENT_CHECKPOINTING (which
    the script applies with `enable_gradient_checkpointing` after loading): the same loss and
    gradients, every trained weight with a gradient, and the layers really recomputed, except a
    frozen vision tower, which the backward pass need not enter at all."""
    runs = {}
    for checkpointing in (False, True):
        model = load(demo_assets, mode)
        if checkpointing:
            flow.enable_gradient_checkpointing(model)
        text_calls, vision_calls = (count_calls(layer) for layer in first_mlps(model))
        trainer = short_trainer(model, processor, splits, tmp_path / str(checkpointing), max_steps=1, grad_accum=1)
        recorder = GradientRecorder(model)
        trainer.add_callback(recorder)
        trainer.train()
        runs[checkpointing] = (logged_losses(trainer)[0], recorder.gradients, text_calls[0], vision_calls[0])
    (plain_loss, plain_gradients, *plain_calls), (loss, gradients, *calls) = runs[False], runs[True]
    frozen_vision = MODES[mode][2]
    assert plain_calls == [1, 1] and calls == [2, 1 if frozen_vision else 2]  # forward, then the recompute
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert_gradients_equal(plain_gradients, gradients)
    assert all(gradient.abs().sum() > 0 for gradient in gradients.values())
