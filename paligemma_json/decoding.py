"""Decoding at real size: a static KV cache and a compiled decoding step where they work, today's
dynamic cache where they do not.

On an H200 a decoding step of the 3B at batch 8 took 36 ms (BENCHMARKS.md) where reading its weights
takes about 1 ms: the step is host and kernel-launch time. With a static KV cache (allocated once for
the longest sequence) `generate` compiles its decoding step, with CUDA graphs (`reduce-overhead`):
one graph replay per token instead of hundreds of kernel launches. The prefill (the image and the
prompt) stays eager, and so do the logits processors, so the schema's mask and the confidence
recorder see the same scores.

Three things stand in the way on PaliGemma 2 (transformers 5.24), all handled here:
- Gemma 2's sliding-window layers keep their length in a Python int, so the compiled step was compiled
  again at every token (an H200 showed it; the CPU does the same): within the window they are made
  plain static layers (`FastDecoding.static_cache`), and a step that recompiles anyway raises
  (`stop_on_recompiles`), which falls back to today's path.
- With a static cache, `generate` prepares the attention masks itself (a dict: full and sliding
  window) and `PaliGemmaModel.forward` hands that dict back to `create_causal_mask`, which fails:
  "'dict' object has no attribute 'ndim'". `pass_prepared_masks` lets a prepared mask through as it is.
- transformers compiles only on a GPU-like device, and never a bitsandbytes (QLoRA) model.

The fast path is used with FAST_DECODING, on a CUDA device, greedy (one beam), with float weights
(not 4-bit), unsharded, and where the card has room for the static cache. Otherwise decoding is
today's, said once. If the fast path fails (no compiler, CUDA graphs that fail on a card), the batch
is decoded again the old way, and so is the rest of the run, said once. Shapes are kept steady so that
the step is compiled once: a last, smaller batch is filled up with copies of its last image, whose
outputs are dropped, and the static cache of a split is sized from its longest prompt plus the token
budget, so prompts of several lengths share one cache and one compiled step.

Every decoding of a split (validation during training, the threshold's pass, the test set's constrained and
free passes, `--predict`) is recorded (`decoding_split`): a line `decoded N images in S s (<path>: <cost>)`,
and the same facts as a JSON line appended to OUTPUT_DIR/decoding.jsonl, so a speed figure always says which
path produced it (docs/speed.md has the fields). The static cache is released when the split is decoded:
during training it would otherwise sit beside every training step, which the fit check does not count
(docs/gpu-memory.md).
"""

import contextlib
import datetime
import json
import os
import time

import torch

from paligemma_json.memory import GIB
CACHE_ROOM = 1.5  # the static cache, with room for the compiled graphs' own buffers (an assumption)
# Compilations one batch may add: the decoding step once (a new model, batch size or token budget), and one
# spare. Past them the step raises instead of running on uncompiled, and the run falls back to today's
# path, said once: on an H200 a step compiled again at every token was far slower than today's.
RECOMPILES_PER_BATCH = 2
DECODING_RECORD = "decoding.jsonl"  # in OUTPUT_DIR: a line per decoding of a split and pass
COMPILE_TIME = "_compile.compile_inner"  # torch's own timer of each frame's compilation (torch._dynamo.utils)


def stop_on_recompiles(fast: bool):
    """Where `fast`, a step compiled more than RECOMPILES_PER_BATCH more times raises. torch's limit counts
    a code object's compilations over the process; every graph compiled so far is an upper bound on it."""
    if not fast:
        return contextlib.nullcontext()
    import torch._dynamo
    from torch._dynamo.utils import counters
    compiled = counters["stats"]["unique_graphs"]
    return torch._dynamo.config.patch(recompile_limit=compiled + RECOMPILES_PER_BATCH,
                                      fail_on_recompile_limit_hit=True)


def pass_prepared_masks() -> None:
    """PaliGemma's forward builds its masks from a 2D attention mask; with a static cache `generate`
    has already built them (a dict of 4D masks by attention type). Let those through unchanged.
    Idempotent; changes nothing for a 2D mask."""
    from transformers.models.paligemma import modeling_paligemma as paligemma
    if getattr(paligemma.create_causal_mask, "passes_prepared_masks", False):
        return

    def passing(make, kind):
        def make_unless_prepared(*args, attention_mask=None, **kwargs):
            if isinstance(attention_mask, dict):  # a kind it lacks, no layer uses (a one-layer model)
                return attention_mask.get(kind)
            return make(*args, attention_mask=attention_mask, **kwargs)
        make_unless_prepared.passes_prepared_masks = True
        return make_unless_prepared
    paligemma.create_causal_mask = passing(paligemma.create_causal_mask, "full_attention")
    paligemma.create_sliding_window_causal_mask = passing(paligemma.create_sliding_window_causal_mask,
                                                          "sliding_attention")


def static_cache_bytes(config, batch_size: int, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of every text layer for `batch_size` sequences of `tokens` (prompt and answer)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * batch_size * tokens * dtype.itemsize


class FastDecoding:
    """One run's choice of decoding path. `enabled`: FAST_DECODING. `compiled`: compile the step
    (off: the static cache alone, which the tests compare token for token with today's path). `devices`:
    where the fast path may run; the CPU too for tests and `benchmarks/decode.py`."""

    def __init__(self, enabled: bool = True, compiled: bool = True, devices: tuple = ("cuda",)):
        self.enabled, self.compiled, self.devices = enabled, compiled, devices
        self.failed = None  # the fast path's error, once it failed: the run stays on today's path
        self.said = set()
        self.cache = None  # (batch size, tokens, dtype, device), and the static cache kept for them
        self.reason = ""  # why the last batch was decoded today's way
        self.passes = {}  # the current split's tallies, by pass ("constrained", "free")
        self.prompts = None  # (processor, prefixes) of the split being decoded: its cache is sized by the longest
        self.longest = None

    def say_once(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            print(line)

    def reason_against(self, model, num_beams: int, batch_size: int, tokens: int, dtype: torch.dtype,
                       sharded: bool = False) -> str | None:
        """Why this batch is decoded today's way, or None to decode it fast. On a CPU, where today's
        path is the design, the reason is never printed."""
        if not self.enabled or model.device.type not in self.devices:
            return ""
        if self.failed is not None:
            return ""  # said when it failed
        if num_beams > 1:
            return "beam search (NUM_BEAMS > 1) keeps today's dynamic cache"
        if getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "base_model", None),
                                                                  "is_loaded_in_4bit", False):
            return "transformers does not compile a 4-bit (QLoRA) model"
        if sharded:
            return "a sharded (FSDP) model decodes with every process in step, on today's path"
        window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
        if window and tokens > window:
            return (f"{tokens} tokens (prompt and answer) outgrow Gemma 2's sliding window of {window}, and such a "
                    "cache would be compiled again at every step")
        held = self.cache is not None and self.cache[0] == (batch_size, tokens, model.dtype, model.device)
        if model.device.type == "cuda" and not held:
            needed = CACHE_ROOM * static_cache_bytes(model.config, batch_size, tokens, dtype)
            free, _ = torch.cuda.mem_get_info(model.device)
            # What torch has reserved but not used is free to it too (a released cache, training's activations):
            # mem_get_info sees only what the caching allocator has not taken from the card.
            free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
            if free < needed:
                return (f"its static cache needs about {needed / GIB:.1f} GiB and {free / GIB:.1f} GiB are free "
                        "(a smaller EVAL_BATCH_SIZE or MAX_NEW_TOKENS makes room)")
        return None

    def use_fast(self, model, *args, **kwargs) -> bool:
        reason = self.reason_against(model, *args, **kwargs)
        if reason:
            self.say_once(f"decoding: today's dynamic cache, not the compiled step: {reason}")
        self.reason = reason or ("FAST_DECODING is off" if not self.enabled else
                                 f"the fast path failed earlier in this run ({self.failed})" if self.failed else
                                 f"the fast path is for {'/'.join(self.devices)}, not {model.device.type}")
        return reason is None

    def cache_tokens(self, model, prompt_length: int, max_new_tokens: int) -> int:
        """The static cache's length: the split's longest prompt (or this batch's, outside a split) plus the
        budget, so that every batch of the split shares one cache and one compiled step."""
        if self.prompts is not None and self.longest is None and self.enabled and model.device.type in self.devices:
            self.longest = longest_prompt(*self.prompts)
        return max(prompt_length, self.longest or 0) + max_new_tokens

    def generate_kwargs(self, model, batch_size: int, tokens: int) -> dict:
        """What `generate` needs for the fast path: `batch_size` sequences of `tokens` (prompt and answer)."""
        from transformers import CompileConfig
        pass_prepared_masks()
        settings = {"cache": self.static_cache(model, batch_size, tokens)}
        if not self.compiled:
            return {**settings, "disable_compile": True}
        compile_config = CompileConfig(fullgraph=False, dynamic=False,
                                       mode="reduce-overhead" if model.device.type == "cuda" else "default")
        compile_config._compile_all_devices = True  # transformers compiles on CUDA alone unless told
        return {**settings, "compile_config": compile_config}

    def static_cache(self, model, batch_size: int, tokens: int):
        """transformers' static cache, with Gemma 2's sliding-window layers made plain static layers when the
        whole sequence fits in the window (it always has: 4,096 tokens): those keep their length in a Python
        int, which the compiled step is specialised on, so it was compiled again at every token (on an H200,
        until torch's limit of 8, then run uncompiled: slower than today's path). Kept from batch to batch,
        emptied before each, so the compiled step sees the same buffers."""
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer
        key = (batch_size, tokens, model.dtype, model.device)
        if self.cache is None or self.cache[0] != key:
            cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=tokens)
            cache.layers = [StaticLayer(max_cache_len=tokens) if layer.is_sliding else layer for layer in cache.layers]
            self.cache = (key, cache)
        with torch.inference_mode():  # its buffers were made under generate's inference mode
            self.cache[1].reset()
        return self.cache[1]

    def fall_back(self, error: Exception) -> None:
        self.failed = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
        self.say_once(f"decoding: the static cache and compiled step failed ({self.failed}); decoding this batch "
                      "again, and the rest of the run, with today's dynamic cache")

    # --- What each decoding cost, and which path it took -------------------------------------------

    def decode_batch(self, decode, fast: bool, images: int, prompt_length: int, pass_name: str, eos: int):
        """`decode(fast)` -> (recorder, output), on today's path again where the fast one fails; timed and
        counted into the split's tally of `pass_name`."""
        before, started, fell_back = compile_counts(), time.perf_counter(), None
        try:
            recorder, output = decode(fast)
        except Exception as error:  # no compiler, CUDA graphs failing on this card: today's path, said once
            if not fast:
                raise
            self.fall_back(error)
            fell_back = self.failed
            recorder, output = decode(False)
        sequences = output.sequences
        if sequences.device.type == "cuda":  # the host may be ahead of the card
            torch.cuda.synchronize(sequences.device)
        seconds, after = time.perf_counter() - started, compile_counts()
        answers = sequences[:images, prompt_length:]
        ended = answers == eos
        tokens = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, answers.shape[1]).sum().item()
        tally = self.passes.setdefault(pass_name, {
            "images": 0, "tokens": 0, "steps": 0, "seconds": 0.0, "batches": 0, "fast_batches": 0, "fell_back": None,
            "reason": "", "steady_s": 0.0, "steady_steps": 0, "device": sequences.device.type,
            **{key: 0 for key in before}})
        new = {key: after[key] - before[key] for key in before}
        steps = sequences.shape[1] - prompt_length
        tally.update(images=tally["images"] + images, tokens=tally["tokens"] + tokens, steps=tally["steps"] + steps,
                     seconds=tally["seconds"] + seconds, batches=tally["batches"] + 1,
                     fast_batches=tally["fast_batches"] + (fast and fell_back is None),
                     fell_back=tally["fell_back"] or fell_back, reason=tally["reason"] or (self.reason if not fast else ""),
                     **{key: tally[key] + new[key] for key in new})
        if not new["graphs"] and fell_back is None:  # a batch that compiled nothing: the steady cost per step
            tally.update(steady_s=tally["steady_s"] + seconds, steady_steps=tally["steady_steps"] + steps)
        return recorder, output

    def records(self, split: str, rank: int, processes: int, about: dict) -> list[dict]:
        """The split's tallies as decoding.jsonl's lines, a line per pass."""
        records = []
        for pass_name, t in self.passes.items():
            if t["fell_back"]:
                path, reason = "dynamic cache, fallen back", t["fell_back"]
            elif t["fast_batches"] == 0:
                path, reason = "dynamic cache", t["reason"]
            else:
                path = "compiled step" if self.compiled else "static cache, uncompiled"
                reason = None if t["fast_batches"] == t["batches"] else \
                    f"{t['batches'] - t['fast_batches']} of {t['batches']} batches on the dynamic cache: {t['reason']}"
            steady = t["steady_s"] / t["steady_steps"] if t["steady_steps"] else \
                (t["seconds"] - t["compile_s"]) / max(t["steps"], 1)
            cudagraphs = t["device"] == "cuda" and t["fast_batches"] and self.compiled  # torch says its skips there
            records.append({
                "split": split, "pass": pass_name, "images": t["images"], "tokens": t["tokens"], "steps": t["steps"],
                "batches": t["batches"], "seconds": round(t["seconds"], 3), "path": path, "reason": reason,
                "compile_s": round(t["compile_s"], 3), "ms_per_step": round(1000 * steady, 3),
                "ms_per_step_from": "batches that compiled nothing" if t["steady_steps"] else "wall less compile_s",
                "graphs_compiled": t["graphs"], "recompilations": max(0, t["graphs"] - 1),
                "cudagraph_skips": t["cudagraph_skips"] if cudagraphs else None, "inductor_cache_hits": t["cache_hits"],
                "cache_tokens": self.cache[0][1] if self.cache else None, "device": t["device"], "rank": rank,
                "processes": processes, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **about})
        return records

    def release(self) -> None:
        """The split is decoded: its static cache goes (the CUDA memory stays reserved by torch, for training or
        the next split's cache), and the next split is sized afresh."""
        self.cache, self.prompts, self.longest, self.passes = None, None, None, {}


def compile_counts() -> dict:
    """torch's running counts: graphs compiled, seconds compiling, CUDA-graph skips, inductor cache hits."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    return {"graphs": counters["stats"]["unique_graphs"], "compile_s": sum(compilation_time_metrics.get(COMPILE_TIME, [])),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "cache_hits": counters["inductor"]["fxgraph_cache_hit"]}


def longest_prompt(processor, prefixes: list[str]) -> int:
    """The longest prompt, in tokens, that `collate_fn` makes of these prefixes ("<image>" + prefix, with the
    image's tokens): asked of the processor itself, with a blank image, once per distinct prefix."""
    from PIL import Image
    unique, longest = sorted(set(prefixes)), 0
    for first in range(0, len(unique), 64):
        chunk = unique[first:first + 64]
        inputs = processor(text=["<image>" + prefix for prefix in chunk], images=[Image.new("RGB", (8, 8))] * len(chunk),
                           return_tensors="pt", padding="longest")
        longest = max(longest, inputs["input_ids"].shape[-1])
    return longest


def decode_batch(fast_decoding: FastDecoding | None, decode, fast: bool, images: int, prompt_length: int,
                 pass_name: str, eos: int):
    """The script's `generate_batch` decodes through this: timed and counted where a run records its decoding."""
    if fast_decoding is None:
        return decode(False)
    return fast_decoding.decode_batch(decode, fast, images, prompt_length, pass_name, eos)


def cache_tokens(fast_decoding: FastDecoding | None, model, prompt_length: int, max_new_tokens: int) -> int:
    if fast_decoding is None:
        return prompt_length + max_new_tokens
    return fast_decoding.cache_tokens(model, prompt_length, max_new_tokens)


def describe(record: dict) -> str:
    """The line a user reads: `decoded N images in S s (<path>: <cost>): <split>, <pass>`."""
    if record["path"].startswith("dynamic cache"):
        cost = f"{record['reason']}; {record['ms_per_step']:.1f} ms/step"
    else:
        graphs = record["graphs_compiled"]
        compiled = ("nothing compiled" if not graphs else f"compiled once in {record['compile_s']:.1f} s" if graphs == 1
                    else f"compiled {graphs} graphs in {record['compile_s']:.1f} s, {record['recompilations']} of them again")
        skips = f", {record['cudagraph_skips']} CUDA-graph skips" if record["cudagraph_skips"] else ""
        cost = f"{compiled}{skips}; {record['ms_per_step']:.1f} ms/step after"
    share = f", process {record['rank']} of {record['processes']}" if record["processes"] > 1 else ""
    return (f"decoded {record['images']} images in {record['seconds']:.1f} s ({record['path']}: {cost}): "
            f"{record['split']}, {record['pass']}{share}")


@contextlib.contextmanager
def decoding_split(fast_decoding: FastDecoding | None, split: str, dataset, processor, output_dir: str, rank: int = 0,
                   processes: int = 1, **about):
    """One decoding of `split` (`dataset`), every pass of it: the static cache sized by its longest prompt, then
    released; a line printed (by the first process) and a JSON line appended to `output_dir`/decoding.jsonl
    (by every process, its own share, with its rank) per pass. `about`: more facts for the record (the
    training step). None: nothing recorded (a test's `GenerationSettings` without a decoding path)."""
    if fast_decoding is None:
        yield
        return
    fast_decoding.release()
    fast_decoding.prompts = (processor, [entry["prefix"] for entry in dataset.entries])
    started = time.perf_counter()
    try:
        yield
        # split_wall_s: what a user waits for the split, every pass, images read and rows written included
        records = fast_decoding.records(split, rank, processes, {"split_wall_s": round(time.perf_counter() - started, 3),
                                                                  **about})
    finally:
        fast_decoding.release()
    append_records(records, output_dir, rank == 0)


def append_records(records: list[dict], output_dir: str, say: bool = True) -> None:
    with open(os.path.join(output_dir, DECODING_RECORD), "a", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")  # short lines, appended: processes writing together do not tear them
            if say:
                print(describe(record))


def read_records(output_dir: str) -> list[dict]:
    """decoding.jsonl's lines, oldest first; none where there is no file."""
    path = os.path.join(output_dir, DECODING_RECORD)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
