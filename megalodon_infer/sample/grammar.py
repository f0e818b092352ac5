"""Structured outputs: a grammar engine (llguidance) decides which tokens may come next.

Owns compiling a `StructuredOutputsParams` into a grammar over the model's vocabulary (once per
distinct constraint: compiled grammars are cached), the per-sequence matcher that advances on every
accepted token, and the batched token bitmask that `sampler.process_logits` applies on the logits'
device. Knows nothing of the tokenizer: the engine hands `GrammarVocabulary` the bytes of every
token id, the special ids and an encoder.

NOTE: why llguidance. It is a ~3 MB wheel with no Python dependencies, computes a mask in tens of
microseconds with no per-vocabulary precompilation (its token trie and lazy lexer make a new schema
cost ~1 ms), takes JSON schemas, regexes, Lark and GBNF, and can inline a JSON schema in a Lark
rule (what tool calls need). xgrammar needs transformers and triton, which this server otherwise
has no use for.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import llguidance
import torch
from torch import Tensor

from megalodon_infer.sample.params import StructuredOutputsParams

# llguidance marks special tokens with a leading 0xFF byte (never valid UTF-8), so no text grammar
# can produce them; `<...>` in a Lark grammar names them.
SPECIAL_TOKEN_MARK = b"\xff"
# NOTE: JSON is generated compact, with the separators `json.dumps` (and our chat template) write:
# a small model otherwise spends tokens on whitespace, and unbounded whitespace can run a request into
# its length limit. A schema's own top-level "x-guidance" overrides this (llguidance's options).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
DEFAULT_CACHE_SIZE = 256


class GrammarVocabulary:
    """The model's vocabulary as llguidance sees it, built once per engine.

    Args:
        token_bytes: V entries, the bytes each id adds to the text (special ids start with
            `SPECIAL_TOKEN_MARK`; ids that can never be emitted are b""). V is the logits' width.
        eos_id: the end-of-sequence id, allowed once the grammar accepts.
        bos_id: the beginning-of-sequence id (None if the model has none).
        special_ids: control and other special ids.
        encode: text -> ids as a continuation of earlier text (no dummy-prefix space, no special
            ids); llguidance uses it to pick the canonical tokens of bytes a grammar forces.
    """

    def __init__(self, token_bytes: Sequence[bytes], eos_id: int, bos_id: int | None,
                 special_ids: Sequence[int], encode: Callable[[str], list[int]]) -> None:
        self.vocab_size = len(token_bytes)
        self._encode = encode
        wrapper = _TokenizerView(list(token_bytes), eos_id, bos_id, sorted(special_ids), self._encode_bytes)
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=self.vocab_size)

    def _encode_bytes(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text)


class _TokenizerView:
    """The attributes and call `llguidance.TokenizerWrapper` reads."""

    def __init__(self, tokens: list[bytes], eos_id: int, bos_id: int | None, special_ids: list[int],
                 encode: Callable[[bytes | str], list[int]]) -> None:
        self.tokens = tokens
        self.eos_token_id = eos_id
        self.bos_token_id = bos_id
        self.special_token_ids = special_ids
        self._encode = encode

    def __call__(self, text: bytes | str) -> list[int]:
        return self._encode(text)


class GrammarMatcher:
    """One sequence's position in its grammar. `accept` advances it by one sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, executor: llguidance.LLExecutor, vocab_size: int) -> None:
        self.matcher = matcher
        self.executor = executor
        self.vocab_size = vocab_size

    @property
    def is_finished(self) -> bool:
        """No further token can extend the text (the grammar is complete, or EOS was accepted)."""
        return self.matcher.is_stopped()

    def accept(self, token_id: int) -> None:
        """Advance by `token_id`; raises ValueError if the grammar does not allow it (the mask was
        bypassed or the matcher failed)."""
        if not self.matcher.consume_token(token_id):
            raise ValueError(f"the grammar rejected token {token_id}: {self.error()}")

    def error(self) -> str:
        return self.matcher.get_error() or "no error reported"


class CompiledGrammar:
    """A grammar compiled for the vocabulary, kept in its initial state; `matcher()` copies it for a
    sequence (a deep copy shares the compiled lexer and parser tables: ~10 us, against ~1 ms to
    compile)."""

    def __init__(self, template: llguidance.LLMatcher, executor: llguidance.LLExecutor, vocab_size: int) -> None:
        self._template = template
        self._executor = executor
        self._vocab_size = vocab_size
        self._lock = threading.Lock()

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            copy = self._template.deep_copy()
        return GrammarMatcher(copy, self._executor, self._vocab_size)


class GrammarCompiler:
    """Compiles constraints for one vocabulary, with an LRU cache of `cache_size` compiled grammars.

    Thread-safe: the server compiles off the event loop while the engine thread samples.
    `num_threads` sizes llguidance's mask-computing pool (None: its default, most of the CPUs).
    """

    def __init__(self, vocabulary: GrammarVocabulary, cache_size: int = DEFAULT_CACHE_SIZE,
                 num_threads: int | None = None) -> None:
        self.vocabulary = vocabulary
        self.cache_size = cache_size
        self.executor = llguidance.LLExecutor(num_threads=num_threads)
        self._cache: OrderedDict[StructuredOutputsParams, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of `spec`; raises ValueError (the grammar engine's message) for an
        invalid schema, regex or grammar."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        source = grammar_source(spec)
        lltokenizer = self.vocabulary.lltokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, lltokenizer)
        if is_error:
            raise ValueError(f"invalid {spec.kind} for structured outputs: {_first_line(messages)}")
        template = llguidance.LLMatcher(lltokenizer, source, log_level=0)
        if template.is_error():
            raise ValueError(f"invalid {spec.kind} for structured outputs: {_first_line([template.get_error()])}")
        return CompiledGrammar(template, self.executor, self.vocabulary.vocab_size)


def grammar_source(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar text for `spec` (not yet checked against a vocabulary)."""
    try:
        if spec.json is not None:
            options = {**JSON_FORMAT, "lenient": spec.lenient}
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=options)
        if spec.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema('{"type":"object"}', defaults=JSON_FORMAT)
        if spec.regex is not None:
            return llguidance.grammar_from("regex", spec.regex)
        if spec.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
        return llguidance.grammar_from("grammar", spec.grammar or "")
    except ValueError as exc:
        raise ValueError(f"invalid {spec.kind} for structured outputs: {exc}") from None


def _first_line(messages: Sequence[str]) -> str:
    # llguidance appends parser state and the whole grammar to some errors: the first line says it
    text = next((m for m in messages if m), "unknown error")
    return text.strip().splitlines()[0][:500]


def fill_bitmask(matchers: Sequence[GrammarMatcher]) -> Tensor:
    """The allowed next tokens of each matcher, as llguidance's bitmask.

    Returns: [R, ceil(V / 32)] int32 on the CPU; bit (i % 32) of word i // 32 is set when token i is
    allowed. Raises ValueError if a matcher is in an error state or allows nothing (the caller's
    isolation then ends that sequence's request alone).
    """
    vocab_size = matchers[0].vocab_size
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros((len(matchers), words), dtype=torch.int32)
    by_executor: dict[int, list[tuple[llguidance.LLMatcher, int]]] = {}
    executors: dict[int, llguidance.LLExecutor] = {}
    for row, m in enumerate(matchers):
        if m.matcher.is_error():
            raise ValueError(f"the grammar failed: {m.error()}")
        by_executor.setdefault(id(m.executor), []).append((m.matcher, row))
        executors[id(m.executor)] = m.executor
    for key, batch in by_executor.items():
        if len(batch) == 1:  # the thread pool's hand-off costs more than one mask
            matcher, row = batch[0]
            matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
        else:
            executors[key].unsafe_compute_mask_ptr(batch, bitmask.data_ptr(), words * 4, len(matchers))
    empty = (bitmask == 0).all(dim=1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise ValueError(f"the grammar allows no next token: {matchers[row].error()}")
    return bitmask


def apply_bitmask(logits: Tensor, rows: list[int], bitmask: Tensor) -> None:
    """Set to -inf, in place, every token the bitmask forbids.

    Args:
        logits: [B, V] float32, on any device.
        rows: R row indices of `logits` the masks belong to.
        bitmask: [R, ceil(V / 32)] int32 (CPU), as `fill_bitmask` returns; copied to the logits' device
            and unpacked there, so a GPU never waits on a per-token Python loop.
    """
    device = logits.device
    vocab_size = logits.shape[-1]
    mask = bitmask.to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((mask.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, :vocab_size].bool()  # [R, V]
    index = torch.tensor(rows, device=device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
