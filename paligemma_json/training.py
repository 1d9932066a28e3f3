"""Training beyond the tutorial's Trainer: validation scored by what it extracts, the loss on label
positions only, gradient checkpointing, early stopping, and the throughput of this session's steps
(speed.py turns it into the line printed and the MFU).

Label-only loss. Only the suffix carries labels; the image tokens (256 at 224 px, 1,024 at 448)
and the prompt are -100. A plain forward still sends every position through the 257,216-wide
output layer, soft-caps the logits and upcasts them to fp32 for the loss: at 448 px, batch 2, about
2.5 GB per copy of the logits, and the backward holds several. `label_only_inputs` asks the model's
own forward for the logits of the scored positions alone (`logits_to_keep`) and hands it the labels
already shifted to match (`shift_labels`), so the loss is the same sum over the same positions,
divided by the same `num_items_in_batch`. Going through the forward keeps DDP's and FSDP's hooks,
which calling `lm_head` by hand would bypass.

The kept positions are a (batch, K) tensor of column indices: the columns from the first to the last
where any row scores a token. The processor pads on the left, so every row's label ends at the
right edge and K is the longest label; a row with a shorter label keeps a few prompt positions
whose label is -100 and adds nothing to the loss. Padding on the right would still be correct, only
with less saved. A (batch, K) tensor, unlike a boolean mask (which flattens rows together), keeps the
batch dimension, so the logits keep their (batch, positions, vocabulary) shape and anything that
splits a batch by rows splits these keys with it.

Gradient checkpointing. `enable_gradient_checkpointing` turns on transformers' non-reentrant
checkpointing of every decoder and SigLIP layer. Reentrant checkpointing gives no gradient to
adapters inside a layer whose input does not require one (SigLIP's layers under LoRA: no pixel
needs a gradient). transformers' usual fix for that, `enable_input_require_grads`, which it applies
whenever checkpointing is turned on, is not needed once checkpointing is non-reentrant, and it costs:
it hooks SigLIP's patch embedding too, so with a frozen vision tower the backward pass would still
run through all of SigLIP (and recompute it) for no gradient. So it is removed again here, which is
why the script turns checkpointing on itself instead of through `TrainingArguments`.

The Trainer's evaluation (`ExtractionTrainer`) also generates on the validation split and scores
the JSON: its field F1 chooses the best checkpoint and drives early stopping. Each process generates
its share of the rows; every one scores them all.

Early stopping (EARLY_STOPPING_PATIENCE) counts the evaluations since validation field F1 last
rose, from the Trainer's log history: the count is never a separate state to restore, so a resumed
run counts the evaluations its checkpoint saw. A tie is not a rise, as in the Trainer's choice of
the best checkpoint. transformers' own EarlyStoppingCallback cannot serve: it reads the metric in
`on_evaluate`, which the Trainer calls before the flow has scored field F1.
"""

import functools
import time

import torch
from transformers import Trainer, TrainerCallback

from paligemma_json.decoding import decoding_split
from paligemma_json.distributed import predict_across_processes
from paligemma_json.metrics import compute_metrics
from paligemma_json.speed import training_report
from paligemma_json.tracking import check_patience

IGNORE_INDEX = -100  # the labels' mark for "not scored": image tokens, prompt, padding
LABEL_ONLY_KEYS = ("logits_to_keep", "shift_labels")
CHECKPOINTING_KWARGS = {"use_reentrant": False}
# COMPILE_TRAINING pads each batch's length, and the label span, to a multiple of this: at 448 px a batch
# of 1,050-1,350 tokens falls in one of 5 lengths, so the compiled step is compiled a few times, not at
# almost every batch (the CPU measured 12x slower steps when it was), for at most 63 padding tokens a row.
STEADY_MULTIPLE = 64


def label_only_inputs(labels: torch.Tensor, multiple: int = 1) -> dict[str, torch.Tensor]:
    """The keys that make the model's forward compute logits and loss on the scored positions only.
    Logits at position i predict the token at i + 1, so the scored logits are those whose next
    label is not -100. `multiple`: the kept span widened to the left to a multiple of it (where the
    sequence allows), so a compiled step sees a few widths (COMPILE_TRAINING); the extra positions score nothing."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    scored_columns = (shifted != IGNORE_INDEX).any(dim=0).nonzero().flatten().tolist() or [0]  # none: keep one
    first, last = scored_columns[0], scored_columns[-1]
    first = max(0, last + 1 - -(-(last + 1 - first) // multiple) * multiple)
    # Every row its own copy: on a GPU the DataLoader pins each tensor into a buffer of the same strides,
    # and an `expand`ed (zero-stride) view cannot be copied into one (it crashed the first step on an H200).
    positions = torch.arange(first, last + 1, device=labels.device).repeat(labels.shape[0], 1)
    return {"logits_to_keep": positions, "shift_labels": shifted[:, first:last + 1].contiguous()}


def with_label_only(batch: dict) -> dict:
    """The batch with the label-only keys added (recomputed from its labels)."""
    return {**batch, **label_only_inputs(batch["labels"])}


def without_label_only(batch: dict) -> dict:
    """The batch as a plain forward takes it: logits at every position (today's loss, for comparisons)."""
    return {key: value for key, value in batch.items() if key not in LABEL_ONLY_KEYS}


def label_only_loss(model, batch: dict, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of `batch` (a `collate_fn` output with labels) with logits on the label
    positions only. `num_items_in_batch`: the scored tokens of the whole accumulated batch, as the
    Trainer passes it; None gives the mean over this batch's scored tokens."""
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**with_label_only(batch), **extra).loss


def full_logits_loss(model, batch: dict, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The same loss with logits at every position, as a plain forward computes it."""
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**without_label_only(batch), **extra).loss


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters, for the line step 4 prints."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every layer, without the input hooks that would send the
    backward through a frozen vision tower. A PeftModel passes both calls to its base model."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    model.disable_input_require_grads()


class EarlyStopping(TrainerCallback):
    """Stops training once validation field F1 has not risen for `patience` evaluations in a row.
    It watches the log: the flow's field F1 is logged once scored."""

    METRIC = "eval_field_f1"

    def __init__(self, patience: int):
        self.patience = patience

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.METRIC not in (logs or {}):
            return
        scores = [(entry[self.METRIC], entry["step"]) for entry in state.log_history if self.METRIC in entry]
        best = max(range(len(scores)), key=lambda index: (scores[index][0], -index))  # the first of equals
        if len(scores) - 1 - best >= self.patience:
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(f"early stopping: validation field F1 has not risen for {self.patience} evaluations "
                      f"(best {scores[best][0]:.4f} at step {scores[best][1]}); stopping at step {state.global_step}")


def early_stopping(patience: int) -> list[TrainerCallback]:
    """The callbacks for EARLY_STOPPING_PATIENCE: none for 0."""
    check_patience(patience)
    return [EarlyStopping(patience)] if patience else []


class SessionStart(TrainerCallback):
    """The tokens a resumed run had seen before this session: the Trainer restores that count from the
    checkpoint, while its runtime covers this session alone."""

    tokens_seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_seen = state.num_input_tokens_seen


class ExtractionTrainer(Trainer):
    """`predict_rows(model, processor, dataset)`: prediction rows for `dataset`, as the script's. `decoding`:
    the run's `FastDecoding`, whose record of each validation's decoding goes to OUTPUT_DIR/decoding.jsonl."""

    def __init__(self, *args, predict_rows, decoding=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.predict_rows, self.decoding = predict_rows, decoding
        self.evaluation_seconds = 0.0  # kept out of the training throughput
        self.session_start = SessionStart()  # after --resume, throughput counts this session's tokens only
        self.add_callback(self.session_start)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        started = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        with decoding_split(self.decoding, "valid", dataset, self.processing_class, self.args.output_dir,
                            self.args.process_index, self.args.world_size, step=self.state.global_step):
            rows = predict_across_processes(functools.partial(self.predict_rows, self.model, self.processing_class),
                                            dataset, self.args.process_index, self.args.world_size)
        scores = compute_metrics(rows)
        extraction = {f"{metric_key_prefix}_{name}": scores[name] for name in ("field_f1", "json_valid_rate")}
        self.log(extraction)
        metrics.update(extraction)
        self.evaluation_seconds += time.perf_counter() - started
        return metrics

    def speed(self, train_result, resumed: bool) -> tuple[str, float, float]:
        """After `train()`: the line to print, and the training steps' own (samples/s, tokens/s)."""
        return training_report(train_result.metrics, train_result.global_step,
                               self.state.num_input_tokens_seen - self.session_start.tokens_seen,
                               self.evaluation_seconds, resumed)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Full weights were loaded by the script's `load_model(checkpoint=...)`: see its
        `load_best_checkpoint` for why. Adapters the Trainer restores correctly."""
        if hasattr(self.model, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
