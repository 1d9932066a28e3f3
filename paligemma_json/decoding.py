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
outputs are dropped.
"""

import contextlib

import torch

from paligemma_json.memory import GIB
CACHE_ROOM = 1.5  # the static cache, with room for the compiled graphs' own buffers (an assumption)
# Compilations one batch may add: the decoding step once (a new model, batch size or token budget), and one
# spare. Past them the step raises instead of running on uncompiled, and the run falls back to today's
# path, said once: on an H200 a step compiled again at every token was far slower than today's.
RECOMPILES_PER_BATCH = 2


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
        if model.device.type == "cuda":
            needed = CACHE_ROOM * static_cache_bytes(model.config, batch_size, tokens, dtype)
            free, _ = torch.cuda.mem_get_info(model.device)
            if free < needed:
                return (f"its static cache needs about {needed / GIB:.1f} GiB and {free / GIB:.1f} GiB are free "
                        "(a smaller EVAL_BATCH_SIZE or MAX_NEW_TOKENS makes room)")
        return None

    def use_fast(self, *args, **kwargs) -> bool:
        reason = self.reason_against(*args, **kwargs)
        if reason:
            self.say_once(f"decoding: today's dynamic cache, not the compiled step: {reason}")
        return reason is None

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
