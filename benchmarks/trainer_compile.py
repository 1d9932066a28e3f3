"""The Trainer's `torch_compile` against the script's eager training: the same losses, step for step,
and what a step costs, on the demo's tiny model (a full fine-tune, as the demo trains it).

    OMP_NUM_THREADS=1 python benchmarks/trainer_compile.py        # a few minutes on this project's CPU

Each side runs in a fresh process (runner.py) through the script's own `training_arguments` and
`build_trainer`, with the demo's learning rate and batch, `STEPS` steps, the loss logged at every step
and no evaluation. The first `WARMUP` steps (the compilation, on the compiled side) are left out of
the step time. The decoding issue (23) asks for equal loss on a CPU and the speed on a GPU; this is
the first, and the lever is not a setting until a GPU has measured the second.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import parent_arguments, run_child  # noqa: E402

STEPS, WARMUP = 40, 5


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
    arguments = flow.training_arguments(os.path.join(request["work_dir"], f"run-{request['compiled']}"), generation, {
        **flow.DEFAULTS, "MAX_STEPS": STEPS, "BATCH_SIZE": 8, "GRAD_ACCUM": 1, "LEARNING_RATE": 2e-3,
        "WARMUP_STEPS": 0, "SAVE_STEPS": 10 * STEPS, "LOGGING_STEPS": 1, "REPORT_TO": ["none"], "SEED": 3})
    arguments = dataclasses.replace(arguments, torch_compile=request["compiled"], save_strategy="no",
                                    eval_strategy="no")
    stamps = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
    trainer = flow.build_trainer(model, processor, splits["train"], splits["valid"], generation, arguments)
    trainer.add_callback(StepClock())
    started = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"compiled": request["compiled"], "losses": losses, "wall_s": time.perf_counter() - started,
            "step_s": (stamps[-1] - stamps[WARMUP - 1]) / (len(stamps) - WARMUP)}


def main(argv=None) -> None:
    if (args := parent_arguments(__doc__, measure, argv)) is None:
        return
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="trainer_compile_")
    rows = {compiled: run_child(__file__, [json.dumps({"compiled": compiled, "work_dir": work_dir})],
                                f"torch_compile={compiled}") for compiled in (False, True)}
    eager, compiled = rows[False], rows[True]
    differences = [abs(a - b) for a, b in zip(eager["losses"], compiled["losses"])]
    print(f"{STEPS} steps, batch 8, the demo's tiny model, fp32: losses {eager['losses'][0]:.4f} -> "
          f"{eager['losses'][-1]:.4f} eager, {compiled['losses'][0]:.4f} -> {compiled['losses'][-1]:.4f} compiled; "
          f"largest difference {max(differences):.2e} (step {differences.index(max(differences)) + 1}), "
          f"mean {sum(differences) / len(differences):.2e}")
    print(f"step time after {WARMUP} steps: eager {1000 * eager['step_s']:.1f} ms, compiled "
          f"{1000 * compiled['step_s']:.1f} ms (x{eager['step_s'] / compiled['step_s']:.2f}); wall "
          f"{eager['wall_s']:.0f} s and {compiled['wall_s']:.0f} s (the compilation in the second)")
    print(f"trainer_compile_loss_gap={max(differences):.2e}")


if __name__ == "__main__":
    main()
