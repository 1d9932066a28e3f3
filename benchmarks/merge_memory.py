"""How much memory `--merge` holds beyond the fp32 weights: the figure behind
`paligemma_json/devices.py`'s WHOLE_COPY_FACTOR, which decides where a merge runs.

    OMP_NUM_THREADS=1 python benchmarks/merge_memory.py      # ~2 min, ~6 GiB of RAM, 2 GB of disk

A base at PaliGemma 2 3B's real widths with 4 text and 4 vision layers (random weights, saved in bf16
as a Hub checkpoint is) and a LoRA adapter with non-zero B on the seven projections, laid out as a
finished run's `final/`. Then, in a fresh process, the script's own `merge_adapter`, with this
process's anonymous memory (`RssAnon`: what cannot be reclaimed) sampled every 20 ms, and its peak
resident set (`VmHWM`, which also counts the checkpoint's pages mapped from disk). The last line is
`merge_memory_ratio=<peak anonymous memory above the start / the fp32 weights>`.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = ("3b", 224, 4, 4)  # size, px, text layers, vision layers


def build(work_dir: str) -> str:
    """The base and a finished LoRA run on it; returns the run's folder."""
    from peft import LoraConfig, get_peft_model

    import finetune_paligemma2 as flow
    from paligemma_json.architecture import paligemma2_config
    from paligemma_json.demo import build_demo
    from real_width import random_model
    base_dir, run_dir = os.path.join(work_dir, "base"), os.path.join(work_dir, "run")
    model = random_model(paligemma2_config(*SHAPE))
    model.save_pretrained(base_dir)
    adapted = get_peft_model(model, LoraConfig(r=8, target_modules=flow.LORA_TARGET_MODULES, init_lora_weights=False,
                                               task_type="CAUSAL_LM"))
    adapted.peft_config["default"].base_model_name_or_path = base_dir
    final_dir = os.path.join(run_dir, "final")
    adapted.save_pretrained(final_dir)
    _, demo_model = build_demo(os.path.join(work_dir, "demo"), seed=0)
    flow.load_processor(demo_model).save_pretrained(final_dir)  # --merge saves the run's processor beside it
    return run_dir


def measure(run_dir: str) -> dict:
    from transformers import PaliGemmaConfig

    import finetune_paligemma2 as flow
    from bench import reset_peak_rss, status_kib
    from paligemma_json.architecture import architecture
    weights = 4 * architecture(PaliGemmaConfig.from_pretrained(os.path.join(ROOT, run_dir, "..", "base"))).parameters
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status_kib("RssAnon"))
            time.sleep(0.02)
    start_anon, start_rss = status_kib("RssAnon"), reset_peak_rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    flow.merge_adapter(run_dir)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"fp32_weights_gib": weights / 2 ** 30, "anonymous_peak_gib": (peak[0] - start_anon) / 2 ** 20,
            "rss_peak_gib": (status_kib("VmHWM") - start_rss) / 2 ** 20, "seconds": seconds}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(sys.argv[2])))
        return
    from runner import run_child
    work_dir = tempfile.mkdtemp(prefix="merge_memory_")
    try:
        result = run_child(__file__, [build(work_dir)], "the merge")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"merge of a {SHAPE[2]}+{SHAPE[3]}-layer 3B-width base: fp32 weights {result['fp32_weights_gib']:.2f} GiB; "
          f"peak anonymous memory {result['anonymous_peak_gib']:.2f} GiB above the start, peak resident "
          f"{result['rss_peak_gib']:.2f} GiB (the mapped checkpoint included); {result['seconds']:.0f} s")
    print(f"merge_memory_ratio={result['anonymous_peak_gib'] / result['fp32_weights_gib']:.2f}")


if __name__ == "__main__":
    main()
