"""Speed levers, one at a time, on the demo's tiny model and this machine: each against ours as
bench.py runs it (the same subprocess per measurement, baseline and lever alternating).

    python benchmarks/levers.py --work-dir /tmp/bench            # reuses bench.py's assets there
    python benchmarks/levers.py --work-dir /tmp/bench --only padding_max_length,group_by_length

Predictions were written into BENCHMARKS.md before this ran. A lever that fails (flex_attention:
no backward on CPU in torch 2.13) is reported in one line and the others go on. Levers that only mean something on a
GPU (fused AdamW, Liger's fused linear cross-entropy, static cache + torch.compile, MFU, pin memory)
are not here.
"""

import functools
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (sets HF_HUB_OFFLINE and the import path)
from runner import answer_if_child, benchmark_parser  # noqa: E402

# name -> (kind, side, variant): the baseline is the same kind and side with no variant.
TRAINING_LEVERS = {
    "padding_max_length": ("ours", {"customize": "pad_to_max_length"}),
    "group_by_length": ("ours", {"customize": "group_by_length"}),
    "dataloader_workers_2": ("ours", {"customize": "two_workers"}),
    "batch_4_accum_2": ("ours", {"BATCH_SIZE": 4, "GRAD_ACCUM": 2}),
    "batch_2_accum_4": ("ours", {"BATCH_SIZE": 2, "GRAD_ACCUM": 4}),
    "flex_attention": ("ours", {"customize": "flex_attention"}),
    "tutorial_without_bf16": ("tutorial", {"bf16": False}),
}
# Inference: (side, baseline variant, lever variant).
INFERENCE_LEVERS = {
    "batched_greedy_vs_one_by_one": ("ours", {"batch_size": 1, "constrained": False, "with_confidence": False},
                                     {"batch_size": 8, "constrained": False, "with_confidence": False}),
    "greedy_vs_beam3_one_by_one": ("tutorial", {"num_beams": 3}, {"num_beams": 1}),
    "constrained_vs_free": ("ours", {"constrained": False, "with_confidence": False},
                            {"constrained": True, "with_confidence": False}),
    "confidence_vs_none": ("ours", {"with_confidence": False}, {"with_confidence": True}),
    "with_free_comparison": ("ours", {}, {"also_free": True}),
}


# --- The training levers that change the built trainer -------------------------------------------

class MaxLengthPadding:
    """The processor, padding every batch to one fixed length instead of the batch's longest."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, **kwargs):
        return self.processor(**{**kwargs, "padding": "max_length", "max_length": self.max_length})


def sequence_lengths(processor, dataset) -> list[int]:
    import torch
    import finetune_paligemma2 as flow
    return [int(flow.collate_fn([dataset[i]], processor, torch.float32)["attention_mask"].sum())
            for i in range(len(dataset))]


def pad_to_max_length(trainer, processor, splits):
    import torch
    import finetune_paligemma2 as flow
    longest = max(sequence_lengths(processor, splits["train"]))
    trainer.data_collator = functools.partial(flow.collate_fn, processor=MaxLengthPadding(processor, longest),
                                              dtype=torch.float32)


def group_by_length(trainer, processor, splits):
    """The Trainer's own LengthGroupedSampler: it cannot find lengths in (image, entry) rows by
    itself (train_sampling_strategy="group_by_length" fails on them), so they are given."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    lengths = sequence_lengths(processor, splits["train"])
    size = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    trainer._get_train_sampler = lambda *args, **kwargs: LengthGroupedSampler(size, lengths=lengths)


def two_workers(trainer, processor, splits):
    trainer.args.dataloader_num_workers = 2  # in place: dataclasses.replace resets accelerate's state


def flex_attention(trainer, processor, splits):
    trainer.model.set_attn_implementation({"text_config": "flex_attention"})


CUSTOMIZE = {function.__name__: function for function in (pad_to_max_length, group_by_length, two_workers,
                                                           flex_attention)}


def measure_quietly(request: dict) -> dict:
    import contextlib
    variant = dict(request.get("variant", {}))
    customize = CUSTOMIZE[variant.pop("customize")] if "customize" in variant else None
    with contextlib.redirect_stdout(sys.stderr):
        return bench.measure_training(request["side"], request["work"], request["samples"], request["output_dir"],
                                      customize=customize, **variant)


# --- The loss check for the attention lever --------------------------------------------------------

def attention_loss_difference(work: dict) -> float:
    """Largest |loss(eager) - loss(flex_attention)| over two fixed training batches, untrained model:
    a lever that changes the numbers is not a speed lever."""
    import torch
    import finetune_paligemma2 as flow
    from transformers import PaliGemmaForConditionalGeneration
    splits = bench.load_demo_splits(work["dataset_dir"])
    processor = flow.load_processor(work["model_dir"])
    losses = {}
    for implementation in ("eager", "flex_attention"):
        model = PaliGemmaForConditionalGeneration.from_pretrained(work["model_dir"])
        model.set_attn_implementation({"text_config": implementation})
        with torch.no_grad():
            losses[implementation] = [
                float(model(**flow.collate_fn([splits["train"][i] for i in range(first, first + 8)], processor,
                                              torch.float32)).loss) for first in (0, 8)]
    return max(abs(a - b) for a, b in zip(losses["eager"], losses["flex_attention"]))


# --- Running them ---------------------------------------------------------------------------------

def compare(measure, baseline: dict, lever: dict, repeats: int, field: str) -> dict:
    """Baseline and lever alternating, `repeats` times each; the lever's ratio per pair."""
    pairs = []
    for repeat in range(repeats):
        order = (("base", baseline), ("lever", lever)) if repeat % 2 == 0 else (("lever", lever), ("base", baseline))
        pair = {name: measure(variant) for name, variant in order}
        pairs.append(pair)
    ratios = [pair["lever"][field] / pair["base"][field] for pair in pairs]
    return {"ratio": bench.spread(ratios), "base": [p["base"] for p in pairs], "lever": [p["lever"] for p in pairs]}


def main(argv=None):
    parser = benchmark_parser(__doc__)  # --work-dir: bench.py's assets (built there when absent)
    parser.add_argument("--samples", type=int, default=480, help="training samples per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated lever names")
    if answer_if_child(args := parser.parse_args(argv), measure_quietly):
        return
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="levers-")
    work = bench.prepare(work_dir)
    chosen = set(args.only.split(",")) if args.only else set(TRAINING_LEVERS) | set(INFERENCE_LEVERS)
    scratch = os.path.join(work_dir, "lever-runs")
    for name, (side, variant) in TRAINING_LEVERS.items():
        if name not in chosen:
            continue
        if name == "flex_attention":
            print(f"flex_attention: max |loss(eager) - loss(flex)| on two fixed batches = "
                  f"{attention_loss_difference(work):.2e}")

        def measure(changes, side=side):
            request = {"kind": "train", "side": side, "work": work, "samples": args.samples,
                       "output_dir": os.path.join(scratch, "run"), "variant": changes}
            result = bench.run_measurement(request, script=__file__)
            shutil.rmtree(request["output_dir"], ignore_errors=True)
            return result
        try:
            report(name, compare(measure, {}, variant, args.repeats, "samples_per_s"), "samples_per_s", "final_loss")
        except RuntimeError as error:  # flex_attention has no backward on CPU (torch 2.13): say so, go on
            print(f"{name}: failed: {str(error).strip().splitlines()[-1]}", flush=True)
    for name, (side, baseline, lever) in INFERENCE_LEVERS.items():
        if name not in chosen:
            continue

        def measure(changes, side=side):
            return bench.run_measurement({"kind": "infer", "side": side, "work": work, "variant": changes})
        report(name, compare(measure, baseline, lever, args.repeats, "images_per_s"), "images_per_s", "valid_json")
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)


def report(name: str, result: dict, field: str, quality: str) -> None:
    def values(side, key):
        return [row[key] for row in result[side]]
    ratio = result["ratio"]
    print(f"{name}: lever/base {field} = {ratio['median']:.2f} [{ratio['min']:.2f}-{ratio['max']:.2f}]; "
          f"base {bench.describe(values('base', field))}, lever {bench.describe(values('lever', field))}; "
          f"{quality} base {bench.describe(values('base', quality), 3)}, lever {bench.describe(values('lever', quality), 3)}",
          flush=True)


if __name__ == "__main__":
    main()
