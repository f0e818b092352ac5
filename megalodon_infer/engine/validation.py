"""The admission rules of a request, each checked once, here: token ids, context length and output
room, the number of choices, logit_bias ids, and its structured-outputs constraint (compiled here,
so a bad schema or grammar is refused before any output). The server maps the errors to HTTP in one
place.

Value ranges of the sampling knobs are `SamplingParams`' own checks; this module checks what needs
the model (vocabulary, context limit) and the engine (slots).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from megalodon_infer.engine.errors import ContextLengthError
from megalodon_infer.engine.structured import StructuredOutputs
from megalodon_infer.sample.grammar import CompiledGrammar
from megalodon_infer.sample.params import SamplingParams

# The output limit of a request nothing limits (it ends at EOS, a stop condition or an abort).
UNLIMITED = sys.maxsize


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against: the embedding table's size (prompt ids), the logits'
    width (logit_bias ids), the optional context cap, the default output limit and the slots."""

    vocab_size: int
    output_vocab_size: int
    max_model_len: int | None
    max_num_seqs: int
    default_max_tokens: int | None = None


def output_room(num_prompt_tokens: int, max_model_len: int | None) -> int:
    """Tokens the context leaves for the output (0 when the prompt fills it; UNLIMITED without a cap)."""
    return UNLIMITED if max_model_len is None else max(0, max_model_len - num_prompt_tokens)


def validate_request(prompt_ids: Sequence[int], params: SamplingParams, limits: RequestLimits) -> int:
    """Check a request against the engine's limits; returns its resolved `max_tokens`.

    `params.max_tokens=None` means "as many as the context allows" (none, when the prompt fills it:
    the choice ends at once with finish reason "length"), and at most `default_max_tokens`. Without a
    context cap there is no context rule. A prompt may fill the context, so echo scoring can use the
    whole window. Raises ValueError (a ContextLengthError for the context rule) naming the problem.
    """
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ValueError(f"token ids must be in [0, {limits.vocab_size}), got {bad[:5]}")
    room = output_room(len(prompt_ids), limits.max_model_len)
    requested = params.max_tokens
    cap = limits.max_model_len
    if cap is not None and (len(prompt_ids) > cap or (requested is not None and requested > room)):
        raise ContextLengthError(len(prompt_ids), requested, cap)
    if params.n > limits.max_num_seqs:
        raise ValueError(f"n ({params.n}) must not exceed max_num_seqs ({limits.max_num_seqs})")
    bad_bias = [t for t in params.logit_bias if not 0 <= t < limits.output_vocab_size]
    if bad_bias:
        raise ValueError(f"logit_bias token ids must be in [0, {limits.output_vocab_size}), got {bad_bias[:5]}")
    if requested is not None:
        return requested
    return min(room, UNLIMITED if limits.default_max_tokens is None else limits.default_max_tokens)


def compile_constraint(params: SamplingParams, structured: StructuredOutputs) -> CompiledGrammar | None:
    """The compiled grammar of a constrained request (None when unconstrained); raises ValueError
    with the grammar engine's message for an invalid schema, regex or grammar."""
    if params.structured_outputs is None:
        return None
    return structured.compile(params.structured_outputs)
