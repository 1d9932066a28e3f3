"""What constrained decoding costs: llguidance against xgrammar on our vocabularies, and constrained
against free generation on the demo's tiny model.

    python benchmarks/grammar_masks.py --run OUTPUT_DIR     # a finished `--demo` run (else one is made, ~1 min)

1. Token masks, single thread, walking real labels token by token: grammar compile time and the
   time to fill one token mask (mean, median, p99), for the demo's tokenizer (1.9k tokens) and for
   a synthetic tokenizer of PaliGemma 2's size (257,152 made-up token strings, logits padded to
   257,216; the real tokenizer cannot be downloaded here). xgrammar is measured only where it is
   installed (`pip install xgrammar` pulls in triton, about 1 GB); llguidance is a requirement.
2. Generation on the test set, batched as the script does it: images/s and ms per generated token,
   free against constrained (our logits processor: mask, unpack, pad to the logits' width).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # llguidance's pool: single-thread, as the public figures are

REAL_VOCAB, REAL_LOGITS = 257_152, 257_216


def synthetic_tokenizer(size: int = REAL_VOCAB, seed: int = 0):
    """A Gemma-like fast tokenizer (byte fallback, `▁` for spaces) whose vocabulary is `size`
    made-up strings: every printable character, then random pieces of JSON-ish text."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    pieces = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 3 + "▁▁▁▁\",:{}[]-./"
    while len(vocab) < size:
        token = ("▁" if rng.random() < 0.4 else "") + "".join(rng.choice(pieces) for _ in range(rng.randint(2, 10)))
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   bos_token="<bos>", unk_token="<unk>")


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def walk_llguidance(tokenizer, schema, labels):
    import llguidance.hf
    import llguidance.torch as llt
    from llguidance import LLMatcher
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    token_lists = [ll_tokenizer.greedy_tokenize(label) for label in labels]
    compiles, masks = [], []
    bitmask = llt.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
    for tokens in token_lists:
        start = time.perf_counter()
        matcher = LLMatcher(ll_tokenizer, LLMatcher.grammar_from_json_schema(schema), log_level=0)
        compiles.append(time.perf_counter() - start)
        for token in tokens:
            start = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            masks.append(time.perf_counter() - start)
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance refused a label token: {matcher.get_error()[:200]}")
    return compiles, masks, token_lists


def walk_xgrammar(tokenizer, schema, token_lists, logits_width):
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=logits_width)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    layout = schema.get("x-guidance", {})
    separators = (layout["item_separator"], layout["key_separator"]) if "item_separator" in layout else None
    plain_schema = json.dumps({k: v for k, v in schema.items() if k != "x-guidance"})
    compiles, masks = [], []
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for tokens in token_lists:
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(plain_schema, any_whitespace=separators is None,
                                                separators=separators)
        matcher = xgr.GrammarMatcher(compiled)
        compiles.append(time.perf_counter() - start)
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(time.perf_counter() - start)
            if not matcher.accept_token(token):
                raise RuntimeError("xgrammar refused a label token")
    return compiles, masks


def mask_table(name, tokenizer, schema, labels, logits_width):
    rows = []
    compiles, masks, token_lists = walk_llguidance(tokenizer, schema, labels)
    rows.append(("llguidance", compiles, masks))
    try:
        rows.append(("xgrammar", *walk_xgrammar(tokenizer, schema, token_lists, logits_width)))
    except ImportError:
        print(f"{name}: xgrammar is not installed (pip install xgrammar); measuring llguidance only")
    print(f"\n{name}: {len(tokenizer):,} tokens, {len(labels)} labels, {sum(map(len, token_lists)):,} masks")
    print(f"{'library':<12}{'compile ms (median)':>22}{'mask µs mean':>15}{'median':>10}{'p99':>10}{'max':>10}")
    for library, compile_times, mask_times in rows:
        micro = [t * 1e6 for t in mask_times]
        print(f"{library:<12}{statistics.median(compile_times) * 1e3:>22.2f}{statistics.mean(micro):>15.1f}"
              f"{statistics.median(micro):>10.1f}{percentile(micro, 0.99):>10.1f}{max(micro):>10.1f}")


def generation_table(run_dir, repeats):
    import torch

    import finetune_paligemma2 as flow
    from paligemma_json.dataset_report import label_lengths, token_budget
    final = os.path.join(run_dir, "final")
    processor, model = flow.load_processor(final), flow.PaliGemmaForConditionalGeneration.from_pretrained(final).eval()
    schema = json.load(open(os.path.join(final, "schema.json")))
    test = flow.load_splits(os.path.join(run_dir, "demo-dataset"), "extract data in JSON format")["test"]
    budget = token_budget(label_lengths(test, processor.tokenizer))  # the labels' size: a fair budget for both
    constraint = flow.build_constraint(schema, processor, constrained=True)
    batches = [[test[i] for i in range(first, min(first + 8, len(test)))] for first in range(0, len(test), 8)]
    generation = flow.GenerationSettings(torch.float32, budget)

    def decode_test_set(current):
        start, tokens = time.perf_counter(), 0
        for batch in batches:
            for row in flow.generate_batch(model, processor, batch, generation, current):
                tokens += len(processor.tokenizer(row["prediction"], add_special_tokens=False)["input_ids"]) + 1
        return time.perf_counter() - start, tokens

    decode_test_set(None)  # warm-up: the first generate pays for allocations
    results = {"free": [], "constrained": []}
    for _ in range(repeats):  # interleaved, so a busy moment of the machine hits both alike
        for label, current in (("free", None), ("constrained", constraint)):
            results[label].append(decode_test_set(current))
    print(f"\ngeneration: demo tiny model, {len(test)} test images, batches of 8, budget {budget} tokens, "
          f"{repeats} repeats, interleaved (median, min-max)")
    print(f"{'decoding':<13}{'images/s':>10}{'spread':>14}{'tokens/s':>10}{'tokens':>8}")
    medians = {}
    for label, runs in results.items():
        seconds = [elapsed for elapsed, _ in runs]
        medians[label], tokens = statistics.median(seconds), runs[0][1]
        print(f"{label:<13}{len(test) / medians[label]:>10.2f}"
              f"{f'{len(test) / max(seconds):.2f}-{len(test) / min(seconds):.2f}':>14}"
              f"{tokens / medians[label]:>10.0f}{tokens:>8}")
    free, constrained = medians["free"], medians["constrained"]
    print(f"constraint overhead: {100 * (constrained - free) / free:+.0f}% of generation time on this CPU, "
          f"{1e3 * (constrained - free) / results['constrained'][0][1]:.2f} ms per generated token")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="OUTPUT_DIR of a finished --demo run; default: make one")
    parser.add_argument("--labels", type=int, default=20, help="labels walked through each grammar")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run_dir = args.run
    if not run_dir:
        run_dir = os.path.join(tempfile.mkdtemp(), "demo")
        print(f"making a demo run in {run_dir} (about a minute)")
        subprocess.run([sys.executable, os.path.join(ROOT, "finetune_paligemma2.py"), "--demo", "--output-dir",
                        run_dir], check=True, stdout=subprocess.DEVNULL)
    from transformers import PaliGemmaProcessor
    schema = json.load(open(os.path.join(run_dir, "final", "schema.json")))
    with open(os.path.join(run_dir, "demo-dataset", "test", "annotations.jsonl")) as rows:
        labels = [json.loads(line)["suffix"] for line in rows][:args.labels]
    demo_tokenizer = PaliGemmaProcessor.from_pretrained(os.path.join(run_dir, "final")).tokenizer
    mask_table("demo tokenizer", demo_tokenizer, schema, labels, len(demo_tokenizer))
    mask_table("synthetic PaliGemma-size tokenizer", synthetic_tokenizer(), schema, labels, REAL_LOGITS)
    generation_table(run_dir, args.repeats)


if __name__ == "__main__":
    main()
