"""Structured outputs in the engine: the tokenizer's vocabulary composed for the grammar engine once,
and constraints compiled (and cached) at admission.

Owns the one place the tokenizer meets `sample.grammar` (sample/ must not import tokenization/):
the bytes of every id (byte-fallback pieces as their byte, word pieces as UTF-8 with the space
mark as a space, special ids marked so no text grammar can produce them) and the continuation
encoder. The vocabulary is built on the first constrained request, so a server that never sees one
pays nothing. Knows nothing of HTTP or of the step.
"""

from __future__ import annotations

import threading

from megalodon_infer.sample.grammar import (
    SPECIAL_TOKEN_MARK,
    CompiledGrammar,
    GrammarCompiler,
    GrammarVocabulary,
)
from megalodon_infer.sample.params import StructuredOutputsParams
from megalodon_infer.tokenization.tokenizer import Tokenizer


def grammar_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> GrammarVocabulary:
    """The grammar engine's view of `tokenizer`, `vocab_size` (the logits' width) ids wide: ids past
    the tokenizer's vocabulary (a padded embedding table) are empty and never allowed."""
    special = tokenizer.special_ids
    tokens = [SPECIAL_TOKEN_MARK + tokenizer.id_to_piece(i).encode("utf-8") if i in special
              else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    tokens += [b""] * (vocab_size - len(tokens))
    bos = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
    return GrammarVocabulary(tokens, tokenizer.eos_id, bos, sorted(special), tokenizer.encode_continuation)


class StructuredOutputs:
    """Compiles a request's constraint for this engine's vocabulary (thread-safe; built lazily)."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, num_threads: int | None = None) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._num_threads = num_threads
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises ValueError for a constraint that cannot be compiled, or a model it cannot apply to."""
        return self._get_compiler().compile(spec)

    def _get_compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                tokenizer = self._tokenizer
                if tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer, and this model has none.")
                if not tokenizer.encodes_continuations:
                    raise ValueError("structured outputs need a tokenizer with byte fallback (to encode text "
                                     "without a dummy-prefix space); this model's has none.")
                self._compiler = GrammarCompiler(grammar_vocabulary(tokenizer, self._vocab_size),
                                                 num_threads=self._num_threads)
            return self._compiler
