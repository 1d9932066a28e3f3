"""Constrained decoding, and the token probabilities a field's confidence is read from.

Generation is held to the labels' JSON Schema by llguidance (a well-kept Rust grammar engine,
`benchmarks/grammar_masks.py` compares it with xgrammar on our vocabularies): at every step a
bitmask says which tokens keep the text a prefix of something the schema accepts, and the others get
-inf. The schema gives right keys in the right order, right types, closed lists and strings of a
bounded length; it cannot give right values.

Confidence is the model's own: for each leaf value, the lowest probability among the tokens that
wrote it, from the raw logits, never from the masked scores, which renormalize over the allowed
tokens and would look surer than the model is. `ChosenTokenProbabilities` records them step by step,
so generation need not keep every step's 257,216-wide logits (`output_logits=True`); confidence.py
reads each field's confidence from them.
"""

from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList

from paligemma_json import FlowError, import_or_stop


# --- The grammar, and the logits processor that applies it -------------------------------------

def require_llguidance():
    """The llguidance module with its tokenizer bridge (hf) and bitmask helpers (torch)."""
    return import_or_stop("llguidance", "llguidance.hf", "llguidance.torch", reason="constrained decoding needs "
                          "llguidance ({error}): pip install -r requirements.txt, or pass --no-constrained")


def compile_schema(schema: dict, ll_tokenizer=None) -> str:
    """llguidance's grammar for the schema, or a one-line error: checked when the data is loaded,
    so a schema it cannot use stops the run before training, not after."""
    LLMatcher = require_llguidance().LLMatcher
    grammar = LLMatcher.grammar_from_json_schema(schema)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
    if failed:
        raise FlowError(f"the schema cannot constrain generation ({messages[0][:200]}); fix it, or pass --no-constrained")
    return grammar


class JsonSchemaConstraint:
    """A schema compiled for one tokenizer; `logits_processor()` gives a fresh one per `generate`.
    Logits past the tokenizer's vocabulary (PaliGemma 2 pads 257,152 tokens to 257,216) are masked."""

    def __init__(self, schema: dict, tokenizer):
        self.llguidance = require_llguidance()
        self.ll_tokenizer = self.llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
        self.grammar = compile_schema(schema, self.ll_tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.executor = self.llguidance.LLExecutor()
        self.worker = None  # the thread that fills the next step's mask while the model computes this one

    def matcher(self):
        return self.llguidance.LLMatcher(self.ll_tokenizer, self.grammar, log_level=0)  # errors end the row

    def logits_processor(self) -> "SchemaLogitsProcessor":
        return SchemaLogitsProcessor(self)

    def next_mask_worker(self) -> ThreadPoolExecutor:
        if self.worker is None:
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="schema-mask")
        return self.worker


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the schema. Works for greedy and beam search alike: each
    row's parser state is found by the tokens it generated so far, so beams that are reordered,
    dropped or duplicated between steps each keep the right state. Special tokens (`<locNNNN>`,
    `<image>`, padding) are never allowed; EOS only where the JSON is complete.

    Greedy decoding need not wait for the mask: `masks_ahead()`, a stopping criterion, runs as soon as
    a token is appended and starts filling the next step's mask in a thread (llguidance releases the
    GIL), while `generate` runs the model's next forward; this processor then takes that mask if it
    was made for exactly the tokens it is given, and makes it itself otherwise."""

    def __init__(self, constraint: JsonSchemaConstraint):
        self.constraint = constraint
        self.prompt_length = None
        self.states = {}  # generated tokens so far (a tuple) -> that row's matcher
        self.bitmask = None  # one buffer, pinned once where CUDA is: allocating it each step cost time
        self.next_mask = None  # ((rows, tokens generated), the mask being filled for them)
        self.masks_made_ahead = 0  # how many steps took a mask filled in the thread

    def _state(self, generated: tuple, previous: dict, children: dict):
        if generated in self.states:
            return self.states[generated]
        parent = previous[generated[:-1]]
        children[generated[:-1]] -= 1
        if parent.is_stopped():  # a finished row, padded by generate: nothing more to check
            return parent
        # The last row to continue a parent takes it over; the others copy it (beams that split).
        matcher = parent if children[generated[:-1]] == 0 else parent.deep_copy()
        matcher.consume_token(generated[-1])
        return matcher

    def _mask(self, rows: list[tuple]) -> torch.Tensor:
        """Advances each row's parser by its last token and fills the bitmask of what may follow."""
        previous, self.states = self.states, {}
        children = {}
        for generated in rows:
            if generated:
                children[generated[:-1]] = children.get(generated[:-1], 0) + 1
        for generated in rows:
            self.states[generated] = self._state(generated, previous, children) if generated else previous[()]
        vocab = self.constraint.ll_tokenizer.vocab_size
        if self.bitmask is None or self.bitmask.shape[0] != len(rows):
            self.bitmask = self.constraint.llguidance.torch.allocate_token_bitmask(len(rows), vocab)
        bitmask = self.bitmask
        stopped = [self.states[generated].is_stopped() for generated in rows]
        first_row = {}  # rows that generated the same tokens share a matcher: one mask each
        for i, generated in enumerate(rows):
            if not stopped[i]:
                first_row.setdefault(generated, i)
        if first_row:
            self.constraint.llguidance.torch.fill_next_token_bitmask_par(
                self.constraint.executor, [(self.states[generated], i) for generated, i in first_row.items()], bitmask)
        for i, generated in enumerate(rows):
            if generated in first_row:
                bitmask[i] = bitmask[first_row[generated]]
        eos = self.constraint.eos_token_id
        # A complete JSON (or a parser in error, which allows nothing) leaves only EOS.
        bitmask[torch.tensor(stopped, dtype=torch.bool)] = 0
        dead = ~bitmask.ne(0).any(dim=1)
        bitmask[dead, eos // 32] |= 1 << (eos % 32)
        return bitmask

    def _rows(self, input_ids: torch.LongTensor) -> list[tuple]:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
            self.states = {(): self.constraint.matcher()}
        return [tuple(row) for row in input_ids[:, self.prompt_length:].tolist()]

    def start_next_mask(self, input_ids: torch.LongTensor) -> None:
        """A token was just appended: fill the next step's mask in the worker thread."""
        if self.prompt_length is None:
            return  # no step was masked yet: the first mask is made where it is needed
        rows = self._rows(input_ids)
        filling = self.constraint.next_mask_worker().submit(self._mask_apart, rows)
        self.next_mask = ((len(rows), input_ids.shape[1]), filling)

    def _mask_apart(self, rows: list[tuple]) -> torch.Tensor:
        with torch.inference_mode():  # as generate's own thread: the buffer may be an inference tensor
            return self._mask(rows)

    def masks_ahead(self) -> StoppingCriteriaList:
        """For `generate(stopping_criteria=...)`, greedy only."""
        return StoppingCriteriaList([MaskAhead(self)])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ahead, self.next_mask = self.next_mask, None
        if ahead is not None and ahead[0] == (input_ids.shape[0], input_ids.shape[1]):
            bitmask = ahead[1].result()  # made for these very tokens (a greedy step adds one per row)
            self.masks_made_ahead += 1
        else:
            if ahead is not None:
                ahead[1].result()  # never two fills at once: they share the parsers
            bitmask = self._mask(self._rows(input_ids))
        vocab = self.constraint.ll_tokenizer.vocab_size
        # Unpacked where the logits are: 32 times fewer bytes cross to the GPU than a bool mask.
        bits = torch.arange(32, dtype=torch.int32, device=scores.device)
        allowed = ((bitmask.to(scores.device).unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab].bool()
        allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - vocab))  # padded logits: never
        return scores.masked_fill(~allowed, float("-inf"))


class MaskAhead(StoppingCriteria):
    """Stops nothing: it only tells the schema's processor that a token was appended, so that the next
    mask is filled while the model runs. Greedy only (beam search reorders rows after this point)."""

    def __init__(self, processor: SchemaLogitsProcessor):
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.processor.start_next_mask(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# --- Confidence per field ---------------------------------------------------------------------

class ChosenTokenProbabilities(LogitsProcessor):
    """Records the probability the raw model gave each token it emitted, keeping only the last
    step's log-probabilities (rows x vocabulary), not every step's logits: 2.2 GiB less at 8 images x
    256 new tokens at PaliGemma 2's vocabulary (BENCHMARKS.md). It changes no score. Put it first in
    `logits_processor`: processors run in list order, so it sees the scores before the schema's
    mask (raw logits in greedy search, their log-softmax in beam search; `generate`'s own processors,
    none under PaliGemma 2's generation config, would run before it). A step's choice is known at
    the next call, as the last column of `input_ids`, or after `generate` returns for the last step.
    Beam search reorders, drops and duplicates rows between steps without telling processors, so,
    as in SchemaLogitsProcessor, a row is found by the tokens it generated (per image): every
    prefix is a node (step, row) of a tree, and a finished beam, never continued, is found through
    the EOS probability recorded for its last row."""

    def __init__(self, num_beams: int, eos_token_id: int):
        self.num_beams, self.eos_token_id = num_beams, eos_token_id
        self.prompt_length = None
        self.rows = {}  # (image, generated tokens) at the last step -> that row
        self.roots = {}  # the same at step 0
        self.children = {}  # (node, token) -> node; node = (step, row)
        # Per step, as Python floats, and one buffer for the log-softmax, rewritten in place: with a
        # small tensor kept per step and a new log-softmax each step, the CPU's allocator held on to
        # up to 1.1 GiB over 256 steps (measured), as if every step's were kept.
        self.chosen = []  # per step: each row's probability of its last token
        self.eos = []  # per step: each row's probability of EOS
        self.log_probs = None  # the last step's

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step, generated = input_ids.shape[1] - self.prompt_length, input_ids[:, self.prompt_length:].tolist()
        keys = [(row // self.num_beams, tuple(tokens)) for row, tokens in enumerate(generated)]
        if step == 0:
            self.chosen.append([1.0] * len(keys))
        else:
            parents = [self.rows[image, tokens[:-1]] for image, tokens in keys]
            self.chosen.append(self.log_probs[parents, input_ids[:, -1]].exp().tolist())
            for row, ((_, tokens), parent) in enumerate(zip(keys, parents)):
                self.children[(step - 1, parent), tokens[-1]] = (step, row)
        self.rows = {key: row for row, key in enumerate(keys)}  # identical beams (all, at step 0): the last one
        if step == 0:
            self.roots = dict(self.rows)
        if self.log_probs is None or self.log_probs.shape != scores.shape:
            self.log_probs = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        torch.log_softmax(scores.float(), dim=-1, out=self.log_probs)
        self.eos.append(self.log_probs[:, self.eos_token_id].exp().tolist())
        return scores

    def probabilities(self, sequences: torch.LongTensor) -> torch.Tensor:
        """(images, generated tokens) for `generate`'s sequences (one per image): each token's
        probability up to EOS, 1.0 past it."""
        tokens = sequences[:, self.prompt_length:].tolist()
        if not self.chosen:  # no step ran
            return torch.ones((len(tokens), 0))
        last_step = len(self.chosen) - 1
        probabilities = torch.ones((len(tokens), len(tokens[0]) if tokens else 0), dtype=torch.float32)
        for image, row_tokens in enumerate(tokens):
            node = (0, self.roots[image, ()])
            for position, token in enumerate(row_tokens):
                child = self.children.get((node, token))
                if child is not None:
                    probabilities[image, position] = self.chosen[child[0]][child[1]]
                elif token == self.eos_token_id:  # a beam that ended here and was never continued
                    probabilities[image, position] = self.eos[node[0]][node[1]]
                elif node[0] == last_step:  # the last step's choice: no later call saw it
                    probabilities[image, position] = self.log_probs[node[1], token].exp().item()
                else:
                    raise RuntimeError(f"no step of generation chose token {token} at position {position}")
                if token == self.eos_token_id:
                    break
                node = child
        return probabilities


def build_constraint(schema: dict | None, processor, constrained: bool) -> JsonSchemaConstraint | None:
    """The labels' schema as a grammar, or None (free decoding): turned off, labels that are not JSON."""
    if not constrained or schema is None:
        print("decoding: free" + ("" if constrained else " (--no-constrained)") + ("" if schema else ", no schema"))
        return None
    constraint = JsonSchemaConstraint(schema, processor.tokenizer)
    print("decoding: constrained to the labels' schema (llguidance)")
    return constraint
