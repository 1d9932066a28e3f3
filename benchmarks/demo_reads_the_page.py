"""When does the demo's tiny model learn to read the paper colour (`copy`) from the page?

Trains the demo model on the demo data with the demo's optimiser settings, in a plain loop (no
Trainer, no generation), and prints every 50 steps the loss and the teacher-forced accuracy of the
colour on the test split: the colour token picked, among the four, right after `{`.

    python benchmarks/demo_reads_the_page.py DEMO_OUTPUT_DIR STEPS [LEARNING_RATE] [SCHEDULE]

DEMO_OUTPUT_DIR holds `demo-dataset/` and `demo-model/` as `--demo` leaves them (or as
`paligemma_json.demo.build_demo` writes them); SCHEDULE is a transformers scheduler name (cosine).
"""

import json
import os
import random
import sys
import time

import torch
from transformers import get_scheduler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_paligemma2 as flow  # noqa: E402
from paligemma_json.demo import DEMO_OVERRIDES, IMAGE_ONLY_FIELD, PAPER_COLOURS  # noqa: E402


def colour_accuracy(model, inputs, colour_ids, truth) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k not in ("logits_to_keep", "shift_labels")}).logits
    model.train()
    right = 0
    for row, colour in enumerate(truth):
        first_label = (inputs["labels"][row] != -100).nonzero()[0].item()  # `{`, which predicts the colour
        right += sorted(PAPER_COLOURS)[logits[row, first_label][colour_ids].argmax().item()] == colour
    return right / len(truth)


def main(demo_dir: str, steps: int, learning_rate: float, schedule: str) -> None:
    torch.manual_seed(0)
    order_rng = random.Random(0)
    processor = flow.load_processor(os.path.join(demo_dir, "demo-model"))
    model = flow.load_model(os.path.join(demo_dir, "demo-model"), False, False, False, 8, [], torch.float32)
    splits = flow.load_splits(os.path.join(demo_dir, "demo-dataset"), DEMO_OVERRIDES["PROMPT"])
    test = [splits["test"][i] for i in range(len(splits["test"]))]
    test_inputs = flow.collate_fn(test, processor, torch.float32)
    truth = [json.loads(entry["suffix"])[IMAGE_ONLY_FIELD] for _, entry in test]
    # The label starts `{"copy": "PINK"`: the second token names the colour.
    colour_ids = [processor.tokenizer.encode(f'{{"{IMAGE_ONLY_FIELD}": "{colour}"', add_special_tokens=False)[1]
                  for colour in sorted(PAPER_COLOURS)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(schedule, optimizer, DEMO_OVERRIDES["WARMUP_STEPS"], steps)
    batch_size, order, started = DEMO_OVERRIDES["BATCH_SIZE"], [], time.time()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order = order_rng.sample(range(len(splits["train"])), len(splits["train"]))
        batch = [splits["train"][order.pop()] for _ in range(batch_size)]
        loss = model(**flow.collate_fn(batch, processor, torch.float32)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            accuracy = colour_accuracy(model, test_inputs, colour_ids, truth)
            print(f"step {step}  loss {loss.item():.3f}  colour accuracy {accuracy:.3f}  {time.time() - started:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else DEMO_OVERRIDES["LEARNING_RATE"],
         sys.argv[4] if len(sys.argv) > 4 else DEMO_OVERRIDES["LR_SCHEDULER"])
