"""Memory levers for a training step: the loss on label positions only, and gradient checkpointing.

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
"""

import torch

IGNORE_INDEX = -100  # the labels' mark for "not scored": image tokens, prompt, padding
LABEL_ONLY_KEYS = ("logits_to_keep", "shift_labels")
CHECKPOINTING_KWARGS = {"use_reentrant": False}


def label_only_inputs(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keys that make the model's forward compute logits and loss on the scored positions only.
    Logits at position i predict the token at i + 1, so the scored logits are those whose next
    label is not -100."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    scored_columns = (shifted != IGNORE_INDEX).any(dim=0).nonzero().flatten().tolist() or [0]  # none: keep one
    first, last = scored_columns[0], scored_columns[-1]
    positions = torch.arange(first, last + 1, device=labels.device).expand(labels.shape[0], -1)
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


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every layer, without the input hooks that would send the
    backward through a frozen vision tower. A PeftModel passes both calls to its base model."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(CHECKPOINTING_KWARGS))
    model.disable_input_require_grads()
