"""Training at the card's pace, the levers one at a time against the script's eager training on the
same machine in the same run: the same losses, step for step, and what a step costs, on the demo's tiny
model (a full fine-tune, as the demo trains it).

    OMP_NUM_THREADS=1 python benchmarks/train_speed.py        # several minutes on this project's CPU

Levers (each in a fresh process, runner.py, through the script's own `training_arguments` and
`build_trainer`, with the demo's learning rate and batch, `STEPS` steps, the loss logged at every step
and no evaluation): `steady`, each batch padded to a multiple of STEADY_MULTIPLE tokens (the label
span too); `compiled`, the Trainer's `torch_compile` on batches padded to their own longest row (a new
shape almost every batch); `compiled+steady`, what COMPILE_TRAINING does. The first `WARMUP` steps (the
first compilations, on the compiled sides) are left out of the step time; the compilations after them
are in it, as a run pays them. Each row counts the graphs dynamo compiled. The last line is the
combination's ratio. `BATCH_SIZE = 0` is not a lever here (2 on a CPU) and flex_attention has no
backward on a CPU: both are the GPU check's.
"""

import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import parent_arguments, run_child  # noqa: E402

STEPS, WARMUP = 40, 5
LEVERS = ("baseline", "steady", "compiled", "compiled+steady")


def measure(request: dict) -> dict:
    import dataclasses

    import torch
    from transformers import TrainerCallback

    import finetune_paligemma2 as flow
    from paligemma_json.demo import build_demo
    dataset_dir, model_dir = build_demo(request["work_dir"], seed=0, reuse=True)
    splits = flow.load_splits(dataset_dir, "extract data in JSON format")
    flow.set_seed(3)
    model = flow.PaliGemmaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = flow.load_processor(model_dir)
    generation = flow.GenerationSettings(torch.float32, 16, 1, 8)
    arguments = flow.training_arguments(os.path.join(request["work_dir"], f"run-{request['lever']}"), generation, {
        **flow.DEFAULTS, "MAX_STEPS": STEPS, "BATCH_SIZE": 8, "GRAD_ACCUM": 1, "LEARNING_RATE": 2e-3,
        "WARMUP_STEPS": 0, "SAVE_STEPS": 10 * STEPS, "LOGGING_STEPS": 1, "REPORT_TO": ["none"], "SEED": 3})
    compiled, steady = "compiled" in request["lever"], "steady" in request["lever"]
    arguments = dataclasses.replace(arguments, torch_compile=compiled, save_strategy="no", eval_strategy="no")
    stamps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
    trainer = flow.build_trainer(model, processor, splits["train"], splits["valid"], generation, arguments)
    trainer.data_collator = functools.partial(flow.collate_fn, processor=processor, dtype=torch.float32,
                                              pad_multiple=flow.STEADY_MULTIPLE if steady else 1)
    trainer.add_callback(StepClock())
    from torch._dynamo.utils import counters
    started = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"lever": request["lever"], "losses": losses, "wall_s": time.perf_counter() - started,
            "step_s": (stamps[-1] - stamps[WARMUP - 1]) / (len(stamps) - WARMUP),
            "graphs": counters["stats"]["unique_graphs"]}


def main(argv=None) -> None:
    if (args := parent_arguments(__doc__, measure, argv)) is None:
        return
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="train_speed_")
    rows = {lever: run_child(__file__, [json.dumps({"lever": lever, "work_dir": work_dir})], lever)
            for lever in LEVERS}
    baseline = rows["baseline"]
    print(f"{STEPS} steps, batch 8, the demo's tiny model, fp32, a full fine-tune; step time after {WARMUP} steps")
    print("| lever | step ms | x baseline | wall s | graphs compiled | largest loss difference |")
    print("|---|---|---|---|---|---|")
    for lever, row in rows.items():
        gap = max(abs(a - b) for a, b in zip(baseline["losses"], row["losses"]))
        print(f"| {lever} | {1000 * row['step_s']:.1f} | {baseline['step_s'] / row['step_s']:.2f} | "
              f"{row['wall_s']:.0f} | {row['graphs']} | {gap:.2e} |")
    print(f"train_speed_combination={baseline['step_s'] / rows['compiled+steady']['step_s']:.2f}")


if __name__ == "__main__":
    main()
