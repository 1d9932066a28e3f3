"""Will a training setting fit on this GPU? The estimated peak memory of one PaliGemma 2 training
step, from the model's config alone, before anything big loads.

    peak = weights + gradients + AdamW state + activations (+ the caching allocator's slack)

Weights, gradients and optimizer state are counted exactly from the architecture (architecture.py: a
model built on the meta device, no memory, no download): bytes per parameter by mode (LoRA: the base in the
compute dtype and fp32 adapters; QLoRA: nf4 linears, 4 bits plus one fp32 absmax per 64 weights,
the rest in the compute dtype; full fine-tune: fp32 everything), fp32 gradients and two fp32 AdamW
moments for what is trained. Gradients are counted whole because with GRAD_ACCUM > 1 (the default
is 4) every micro-batch after the first runs with the previous ones' gradients held.

Activations: the most the step holds above that, with coefficients in bytes fitted by
`benchmarks/real_width.py`. Per sample, at the start of the backward (`activation_parts` has the rest):

    rest    x T x d                 embeddings, the final norm and what the loss keeps (per token)
  + head    x H x V                 logits: soft-capped, upcast to fp32, log-softmax (per logit)
  + layers  x (text_linear x T x d + text_quadratic x heads x T^2)   each Gemma 2 layer (eager attention)
  + vision layers x vision x P x d_vision                            each trained SigLIP layer (SDPA)

T: image tokens + prompt + label; P: image patches; H: positions given logits (T for a plain
forward, the label's alone with the label-only loss of `paligemma_json/training.py`, which the script
uses); V: the padded vocabulary. Later in the backward a text layer's MLP gradients (`mlp_backward`
x T x d) and then its attention's (`attention_backward` x heads x T^2 + `attention_linear` x T x d,
on top of its saved scores) can exceed the logits' share: the largest phase sets the peak. With gradient checkpointing each layer
keeps only its input (T x d in the compute dtype) and the two attention masks, and one layer at a
time is rebuilt for its backward. A full fine-tune adds autocast's bf16 copies of its weights and
the LM head's weight gradient (`layer_weights` per layer weight, `embedding` per V x d), and a last
phase where the tied embedding's two fp32 gradients meet (`embedding_end` x V x d).

These are CPU-derived estimates: measured with torch's CPU allocator at the real widths with one
to three layers (`python benchmarks/real_width.py`), extrapolated per layer. A GPU adds what the CPU
cannot show, added here as stated constants: the CUDA context (outside torch's count, and already
taken when `torch.cuda.mem_get_info` reports free memory) and the caching allocator's slack.
"""

from dataclasses import dataclass, field, replace

import torch

from paligemma_json.architecture import Architecture, architecture
from paligemma_json.lora import adapter_parameters
from paligemma_json.plan import read_launch

GIB = 1024 ** 3
# The CUDA context lives outside torch's allocator: "around 400MB if CUDA >= 11.7 is used and lazy module
# loading enabled" (pytorch/pytorch#109888), ~300 MB in #107667. Counted against a card's total only: by the
# time `torch.cuda.mem_get_info` answers, it has created the context (pytorch/pytorch#103584).
CUDA_CONTEXT_BYTES = 0.5 * GIB
# The caching allocator keeps freed blocks and splits large ones, so reserved memory exceeds the peak
# allocated (PyTorch's torch.cuda.memory_allocated docs say so without a figure). 10% of what a step
# allocates above the weights was an assumption; an H200 then measured the reserved peak (RESERVED_CHECKED).
ALLOCATOR_SLACK = 0.10
# What a GPU showed of the estimate the fit check compares (`Estimate.total`, the reserved memory): on an
# H200, 2026-12-04, seven settings of the full-depth 3B (shared/GPU-RUNS.md), estimate / measured - 1 ran
# from -8.2% to +4.0% (allocated: -2.0% to -0.7%). Printed with the estimate, for a close call.
RESERVED_CHECKED = "on an H200 the measured peak ran 4% below to 9% above such estimates"

QLORA_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # nf4: 4 bits, and one fp32 absmax per block of 64 (no double quant)
COMPUTE_BYTES = {"bf16": 2, "fp32": 4}
PROMPT_TOKENS = 20  # "<bos>" + a short instruction + "\n"
LABEL_TOKENS = 150  # a pallet manifest's JSON

# Activation coefficients (bytes), copied from the output of
#     OMP_NUM_THREADS=1 python benchmarks/real_width.py      (2026-11-29; torch 2.13.0 CPU, transformers 5.24.0,
#                                                             peft 0.21.2, bitsandbytes 0.50.2)
# whose held-out points they predict within 3.6% (`fit_model_error=0.0363`). QLoRA's are LoRA's (measured
# equal); a full fine-tune's are LoRA's plus its own; fp32's "attention_*" are scaled from bf16 (an assumption
# a held-out point checks) and its full fine-tune is not measured at all.
COEFFICIENTS = {
    ('lora', 'bf16'): {"rest": 6.248, "head": 13.98, "text_linear": 66.28, "text_quadratic": 7.806, "vision": 25.91, "mlp_backward": 31.83, "attention_backward": 6.433, "attention_linear": 8.99, "layer_weights": 0, "embedding": 0, "embedding_end": 0},
    ('qlora', 'bf16'): {"rest": 6.248, "head": 13.98, "text_linear": 66.28, "text_quadratic": 7.806, "vision": 25.91, "mlp_backward": 31.83, "attention_backward": 6.433, "attention_linear": 8.99, "layer_weights": 0, "embedding": 0, "embedding_end": 0},
    ('full', 'bf16'): {"rest": 6.248, "head": 13.98, "text_linear": 66.28, "text_quadratic": 7.806, "vision": 25.91, "mlp_backward": 31.83, "attention_backward": 6.433, "attention_linear": 8.99, "layer_weights": 2.187, "embedding": 5.119, "embedding_end": 8.007},
    ('lora', 'fp32'): {"rest": 8.965, "head": 15.96, "text_linear": 102.4, "text_quadratic": 7.982, "vision": 43.1, "mlp_backward": 21.87, "attention_backward": 6.578, "attention_linear": 13.89, "layer_weights": 0, "embedding": 0, "embedding_end": 0},
    ('qlora', 'fp32'): {"rest": 8.965, "head": 15.96, "text_linear": 102.4, "text_quadratic": 7.982, "vision": 43.1, "mlp_backward": 21.87, "attention_backward": 6.578, "attention_linear": 13.89, "layer_weights": 0, "embedding": 0, "embedding_end": 0},
    ('full', 'fp32'): {"rest": 8.965, "head": 15.96, "text_linear": 102.4, "text_quadratic": 7.982, "vision": 43.1, "mlp_backward": 21.87, "attention_backward": 6.578, "attention_linear": 13.89, "layer_weights": 2.187, "embedding": 5.119, "embedding_end": 8.007},
}


@dataclass(frozen=True)
class TrainingSetting:
    """What the estimate needs to know about a run, in the script's terms."""
    mode: str  # "lora", "qlora" or "full"
    compute: str  # "bf16" (compute capability 8.0+) or "fp32" (a T4, a CPU)
    batch_size: int
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    label_only_loss: bool = True  # logits on the label positions only (paligemma_json/training.py)
    label_tokens: int = LABEL_TOKENS
    prompt_tokens: int = PROMPT_TOKENS
    lora_rank: int = 8
    lora_targets: tuple = ("q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    grad_accum: int = 4  # only the advice uses it: a smaller batch keeps batch x accumulation

    def describe(self) -> str:
        parts = [{"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tune"}[self.mode], self.compute,
                 f"batch {self.batch_size}", "checkpointing" if self.gradient_checkpointing else "no checkpointing"]
        if self.freeze_vision:
            parts.append("frozen vision")
        if not self.label_only_loss:
            parts.append("logits at every position")
        return ", ".join(parts)


@dataclass
class Estimate:
    """Bytes of one training step's peak, by part."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    parts: dict = field(default_factory=dict)  # the activation bytes of each phase of the step

    @property
    def allocated(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> float:
        """What the caching allocator reserves at the peak (the context is not included)."""
        return self.allocated + ALLOCATOR_SLACK * (self.gradients + self.optimizer + self.activations)


# --- Weights, gradients and optimizer state --------------------------------------------------------

def lora_parameters(arch: Architecture, setting: TrainingSetting) -> int:
    return sum(adapter_parameters(arch.lora_shapes, setting.lora_rank, setting.lora_targets,
                                  setting.freeze_vision).values())


def trained_parameters(arch: Architecture, setting: TrainingSetting) -> int:
    if setting.mode in ("lora", "qlora"):
        return lora_parameters(arch, setting)
    return arch.parameters - (arch.vision_parameters if setting.freeze_vision else 0)


def weight_bytes(arch: Architecture, setting: TrainingSetting) -> float:
    compute = COMPUTE_BYTES[setting.compute]
    if setting.mode == "full":
        return 4 * arch.parameters  # fp32 master weights: bf16 runs as autocast
    adapters = 4 * lora_parameters(arch, setting)  # peft keeps adapters in fp32 under a bf16 base
    if setting.mode == "lora":
        return compute * arch.parameters + adapters
    rest = arch.parameters - arch.linear_weights
    return QLORA_BYTES_PER_WEIGHT * arch.linear_weights + compute * rest + adapters


# --- Activations ------------------------------------------------------------------------------------

def tokens(arch: Architecture, setting: TrainingSetting) -> tuple[int, int]:
    """(T, H): tokens per sample, and positions given logits. The label-only loss keeps the label's
    positions and the one before the first label token."""
    total = arch.patches + setting.prompt_tokens + setting.label_tokens
    return total, (setting.label_tokens + 1 if setting.label_only_loss else total)


def activation_parts(arch: Architecture, setting: TrainingSetting, coefficients: dict | None = None) -> dict:
    """The step's peak above the weights and held gradients, by phase (bytes, batch included):
    `backward_start`, when every layer's saved activations and the logits' are held; `mlp` and
    `attention`, when the last text layer's (or, checkpointed, the rebuilt layer's) MLP and then
    attention backward run; for a full fine-tune `embedding`, when the tied embedding's two fp32
    gradients meet at the end of the backward, the rest freed. The peak is the largest."""
    k = coefficients or COEFFICIENTS[(setting.mode, setting.compute)]
    T, H = tokens(arch, setting)
    d, heads, B, layers = arch.hidden, arch.heads, setting.batch_size, arch.text_layers
    vision_layers = 0 if setting.freeze_vision else arch.vision_layers  # a frozen tower keeps no graph
    text_layer = k["text_linear"] * T * d + k["text_quadratic"] * heads * T * T
    # A text layer's backward: first its MLP's gradients, with all of the layer's activations still held;
    # then its attention's, with the MLP's freed and the scores' fp32 gradients made.
    mlp_backward = k["mlp_backward"] * T * d
    attention = ((k["text_quadratic"] + k["attention_backward"]) * heads * T * T + k["attention_linear"] * T * d)
    head = k["head"] * H * arch.vocab
    rest = k["rest"] * T * d
    if setting.gradient_checkpointing:  # each layer keeps its input; the one being rebuilt keeps the rest
        size = COMPUTE_BYTES[setting.compute]
        masks = (2 if layers > 1 else 1) * T * T * size  # the full and the sliding-window mask
        kept = rest + size * (T * d * layers + arch.patches * arch.vision_hidden * vision_layers) + masks
        phases = {"backward_start": kept + head, "mlp": kept + text_layer + mlp_backward, "attention": kept + attention}
        copied_layer_weights = arch.text_layer_weights  # autocast's bf16 copies: one layer at a time
    else:
        held = rest + k["vision"] * arch.patches * arch.vision_hidden * vision_layers
        phases = {"backward_start": held + layers * text_layer + head, "mlp": held + layers * text_layer + mlp_backward,
                  "attention": held + (layers - 1) * text_layer + attention}
        copied_layer_weights = arch.text_layer_weights * layers + arch.vision_layer_weights * vision_layers
    phases = {name: B * value for name, value in phases.items()}
    if setting.mode == "full":  # bf16 copies of the trained weights, and the LM head's weight gradient
        extra = k["layer_weights"] * copied_layer_weights + k["embedding"] * arch.vocab * d
        phases = {name: value + extra for name, value in phases.items()}
        phases["embedding"] = k["embedding_end"] * arch.vocab * d
    return phases


def estimate(arch: Architecture, setting: TrainingSetting, coefficients: dict | None = None) -> Estimate:
    trained = trained_parameters(arch, setting)
    parts = activation_parts(arch, setting, coefficients)
    return Estimate(weights=weight_bytes(arch, setting), gradients=4 * trained, optimizer=8 * trained,
                    activations=max(parts.values()), parts=parts)


# --- Advice -----------------------------------------------------------------------------------------

def candidates(setting: TrainingSetting) -> list[tuple[str, TrainingSetting]]:
    """Changes that cut memory, cheapest first: checkpointing costs time only; a smaller batch with
    more accumulation keeps the effective batch; LoRA and QLoRA change what is trained and how
    precisely; a frozen vision tower stops SigLIP from adapting to documents."""
    changes = []
    if not setting.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if setting.batch_size > 1:
        accumulation = setting.batch_size * setting.grad_accum
        changes.append((f"--batch-size 1 --grad-accum {accumulation}", {"batch_size": 1, "grad_accum": accumulation}))
    if setting.mode == "full":
        changes.append(("--use-lora", {"mode": "lora"}))
    if setting.mode != "qlora":
        changes.append(("--use-qlora", {"mode": "qlora"}))
    if not setting.freeze_vision:
        changes.append(("--freeze-vision", {"freeze_vision": True}))
    singles = [(flags, replace(setting, **change)) for flags, change in changes]
    combined = []
    for count in range(2, len(changes) + 1):  # then the first two, three, ... together
        flags, changed = [], setting
        for flag, change in changes[:count]:
            flags.append(flag)
            changed = replace(changed, **change)
        if "--use-qlora" in flags and "--use-lora" in flags:
            flags.remove("--use-lora")  # QLoRA is LoRA on a 4-bit base
        combined.append((" ".join(flags), changed))
    return singles + combined


def fit_report(arch: Architecture, setting: TrainingSetting, free_bytes: float, card: str) -> list[str]:
    """Lines to print: the estimate against the free memory, and when it does not fit, the cheapest
    change that does, with the estimate of every change evaluated."""
    peak = estimate(arch, setting).total
    lines = [f"memory: estimated peak {peak / GIB:.1f} GiB for {setting.describe()} (paligemma_json/memory.py; "
             f"{RESERVED_CHECKED}) against {free_bytes / GIB:.1f} GiB free on {card}"]
    if peak <= free_bytes:
        return lines
    evaluated = [(flags, estimate(arch, changed).total) for flags, changed in candidates(setting)]
    fitting = [(flags, total) for flags, total in evaluated if total <= free_bytes]
    if fitting:
        flags, total = fitting[0]
        lines.append(f"memory: it may not fit; the cheapest change that does: {flags} (est. {total / GIB:.1f} GiB)")
    else:
        lines.append("memory: it may not fit, and no change tried here fits either; a card with more memory?")
    lines.append("memory:   estimates tried: " + "; ".join(f"{flags}: {total / GIB:.1f} GiB"
                                                           for flags, total in evaluated))
    lines.append("memory:   going on anyway: an estimate can be wrong")
    return lines


def training_setting(settings: dict, dtype: torch.dtype) -> TrainingSetting:
    """A run's settings, by the script's names (USE_LORA ... MAX_NEW_TOKENS, resolved: the label tokens), in
    `dtype`, as a TrainingSetting."""
    mode = "qlora" if settings["USE_QLORA"] else "lora" if settings["USE_LORA"] else "full"
    return TrainingSetting(mode=mode, compute="bf16" if dtype == torch.bfloat16 else "fp32",
                           batch_size=settings["BATCH_SIZE"], grad_accum=settings["GRAD_ACCUM"],
                           gradient_checkpointing=settings["GRADIENT_CHECKPOINTING"],
                           freeze_vision=settings["FREEZE_VISION"], label_tokens=settings["MAX_NEW_TOKENS"],
                           lora_rank=settings["LORA_RANK"], lora_targets=tuple(settings["LORA_TARGET_MODULES"]))


def card_config(model_id: str, cache_only: bool = False):
    """The model's config, to estimate from before the weights load; None (said) when it cannot be read:
    the model's own loading then reports a missing model properly."""
    from transformers import PaliGemmaConfig
    try:
        return PaliGemmaConfig.from_pretrained(model_id, local_files_only=cache_only)
    except Exception as error:
        print(f"memory: check skipped, no config for {model_id} ({type(error).__name__})")
        return None


def check_fit(model_id: str, setting: TrainingSetting, cache_only: bool = False) -> None:
    """On a GPU, before the model loads: print the estimate of `setting` against this card's free
    memory. Never stops the run; a config that cannot be read only skips the check."""
    if not torch.cuda.is_available():
        return
    config = card_config(model_id, cache_only)
    if config is None:
        return
    device = read_launch().local_rank  # this process's GPU
    free_bytes, _ = torch.cuda.mem_get_info(device)
    for line in fit_report(architecture(config), setting, free_bytes, torch.cuda.get_device_name(device)):
        print(line)


# BATCH_SIZE = 0 picks the largest micro-batch whose estimate, with this margin, fits the free memory: the
# H200 measured reserved peaks up to 9% above the estimate (RESERVED_CHECKED).
BATCH_MARGIN = 0.10
DEFAULT_MICRO_BATCH = 2  # what BATCH_SIZE 0 keeps the effective batch of: 2 x GRAD_ACCUM


def largest_fitting_batch(model_id: str, settings: dict, dtype: torch.dtype, cache_only: bool = False) -> dict:
    """BATCH_SIZE 0: the largest divisor of the effective batch the default micro-batch gives
    (2 x GRAD_ACCUM) whose estimated peak, plus BATCH_MARGIN, fits this card's memory, and the
    accumulation that keeps that effective batch: `{"BATCH_SIZE", "GRAD_ACCUM"}`, printed. The card's
    total less the CUDA context, not its free memory of the moment: every process of a launch then picks
    the same on the same cards, as DDP needs. On a CPU, where no card bounds it, or without a config to
    estimate from, the default micro-batch of 2."""
    effective = DEFAULT_MICRO_BATCH * settings["GRAD_ACCUM"]
    config = card_config(model_id, cache_only) if torch.cuda.is_available() else None
    if config is None:
        where = "on a CPU, where no card bounds it" if not torch.cuda.is_available() else "without an estimate"
        print(f"batch: BATCH_SIZE 0 is {DEFAULT_MICRO_BATCH} {where}: {DEFAULT_MICRO_BATCH} x accumulation "
              f"{settings['GRAD_ACCUM']} = {effective}")
        return {"BATCH_SIZE": DEFAULT_MICRO_BATCH, "GRAD_ACCUM": settings["GRAD_ACCUM"]}
    device = read_launch().local_rank
    usable = torch.cuda.get_device_properties(device).total_memory - CUDA_CONTEXT_BYTES
    arch, setting = architecture(config), training_setting({**settings, "BATCH_SIZE": 1}, dtype)
    for size in sorted((size for size in range(1, effective + 1) if effective % size == 0), reverse=True):
        peak = estimate(arch, replace(setting, batch_size=size, grad_accum=effective // size)).total
        if peak * (1 + BATCH_MARGIN) <= usable or size == 1:
            fits = "the largest that fits" if peak * (1 + BATCH_MARGIN) <= usable else "and even that may not fit"
            print(f"batch: {size} x accumulation {effective // size} = {effective}, {fits} (estimated peak "
                  f"{peak / GIB:.1f} GiB + {BATCH_MARGIN:.0%} against {usable / GIB:.1f} GiB on "
                  f"{torch.cuda.get_device_name(device)}, less the CUDA context)")
            return {"BATCH_SIZE": size, "GRAD_ACCUM": effective // size}
