"""Turns a batch of logits into next tokens, one sequence per row, plus the logprobs users asked for.

Owns per-sequence sampling state (the sequence's own generator, its output ids, penalty counts; the
engine's per-choice object extends `SequenceSamplingState`) and the order in which logits are
processed. Knows nothing of the scheduler, slots, HTTP or the
tokenizer: stop *strings* are matched on text elsewhere; only token ids are seen here.

NOTE: reproducibility. Every random draw of a row comes from that row's own `torch.Generator` and
consumes a fixed amount of it (V exponentials per random step, nothing for greedy rows), so a seeded
request produces the same tokens whatever else shares its batch and wherever its row sits. Filtering
is vectorized across rows; only the noise draw loops over rows, because each row owns a generator.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from megalodon_infer.sample.grammar import GrammarMatcher, apply_bitmask, fill_bitmask
from megalodon_infer.sample.logprobs import TokenLogprob, gather_logprobs
from megalodon_infer.sample.params import SamplingParams

# Temperatures below this are treated as greedy, as vLLM does: dividing by them would overflow.
_SAMPLING_EPS = 1e-5
_SEED_MODULUS = 2**64


@dataclass
class SampleOutput:
    """What `sample` chose for each row of the batch, in row order; `logprobs[i]` is None when row
    i's sequence did not ask for logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class SequenceSamplingState:
    """Everything sampling needs to remember about one sequence between steps.

    Args:
        params: the request's sampling settings.
        prompt_ids: the prompt's token ids (seed the repetition penalty's "seen" set), in
            [0, vocab_size): the engine validates them once, at admission.
        vocab_size: V, the width of the logits rows this state will be sampled from.
        eos_id: the end-of-sequence id that `min_tokens` suppresses; None if the model has none.
        device: where the logits live; the generator and penalty tensors are kept there.
        seed: the generator's seed. Defaults to `params.seed`, else a random seed drawn now, kept in
            `self.seed` so an unseeded request can still be replayed.
        grammar: the sequence's own matcher when its output is constrained (structured outputs).

    After each `sample`, the caller appends the chosen token with `append_token`; sampling itself
    never mutates a state except by consuming its generator.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        eos_id: int | None,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        grammar: GrammarMatcher | None = None,
    ) -> None:
        self.params = params
        self.grammar = grammar
        self.prompt_ids = prompt_ids
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.device = torch.device(device)
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.seed = seed % _SEED_MODULUS
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.output_ids: list[int] = []
        self.bias_ids = list(params.logit_bias)
        self.bias_values = [params.logit_bias[i] for i in self.bias_ids]
        self.min_tokens_banned_ids = self._min_tokens_banned_ids()
        # NOTE: penalty tensors exist only when their penalty is on, so plain requests cost nothing;
        # each new token updates them in O(1), which keeps a step O(V) however long the sequence.
        self.output_counts: torch.Tensor | None = None  # [V] int32, output tokens only
        self.seen_mask: torch.Tensor | None = None  # [V] bool, prompt and output tokens
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=self.device)
        if params.repetition_penalty != 1.0:
            self.seen_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if prompt_ids:
                self.seen_mask[torch.tensor(prompt_ids, device=self.device)] = True

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < _SAMPLING_EPS

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    def append_token(self, token_id: int) -> None:
        """Record a sampled token so the next step's penalties, `min_tokens` and grammar see it.
        Raises ValueError if the grammar rejects it."""
        if self.grammar is not None:
            self.grammar.accept(token_id)
        self.output_ids.append(token_id)
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
        if self.seen_mask is not None:
            self.seen_mask[token_id] = True

    def _min_tokens_banned_ids(self) -> list[int]:
        # vLLM semantics: min_tokens holds back every id that would stop the sequence. With
        # ignore_eos, EOS does not stop it, so EOS stays allowed.
        banned = set(self.params.stop_token_ids)
        if self.eos_id is not None and not self.params.ignore_eos:
            banned.add(self.eos_id)
        return sorted(i for i in banned if 0 <= i < self.vocab_size)


def sample(logits: torch.Tensor, states: list[SequenceSamplingState]) -> SampleOutput:
    """Choose one token per row.

    Args:
        logits: [B, V] raw model logits (any float dtype; processed in float32, never modified).
        states: B states; row i is sampled with `states[i]`.

    Order, per row (vLLM's): logit_bias, min_tokens, repetition penalty, frequency and presence
    penalties, the grammar's mask (structured outputs); then greedy rows take the argmax, and random
    rows apply temperature, top-k, top-p, min-p and draw with their own generator. Logprobs, when
    asked for, are of the RAW logits (vLLM V1's default `raw_logprobs`): they score what the model
    believes, not what the knobs did.
    """
    processed = process_logits(logits, states)
    token_ids = processed.argmax(dim=-1)  # [B]; greedy never touches a generator
    random_rows = [i for i, state in enumerate(states) if not state.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        token_ids[rows] = _sample_random(processed[rows], [states[i] for i in random_rows])
    return SampleOutput(token_ids.tolist(), _sampled_logprobs(logits, token_ids, states))


def process_logits(logits: torch.Tensor, states: list[SequenceSamplingState]) -> torch.Tensor:
    """The request-specific edits that precede temperature, in vLLM's order.

    Args:
        logits: [B, V] raw model logits; never modified.
        states: B states; row i is edited with `states[i]`.

    Returns: a new [B, V] float32 tensor with logit_bias added, `min_tokens`-suppressed ids at -inf,
    then the repetition penalty (prompt and output tokens) and the frequency and presence penalties
    (output tokens only) applied, and the tokens each row's grammar forbids at -inf. Greedy rows take
    the argmax of this. Raises ValueError when a grammar has failed or allows nothing.
    """
    _check_batch(logits, states)
    processed = logits.to(dtype=torch.float32, copy=True)
    _apply_logit_bias(processed, states)
    _apply_min_tokens(processed, states)
    _apply_penalties(processed, states)
    _apply_grammars(processed, states)
    return processed


def filter_logits(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Set to -inf the tokens each row's top-k, then top-p, then min-p would drop.

    Args:
        logits: [B, V] float32, already divided by temperature.
        top_k: B ints; -1 (or >= V) keeps everything. Exactly k tokens survive; ties at the k-th
            place keep the lower ids, so top-k 1 is the argmax.
        top_p: B floats in (0, 1]; keeps the smallest most-likely prefix whose mass reaches p,
            measured after top-k.
        min_p: B floats in [0, 1]; drops tokens whose probability is below min_p times the top
            token's. Applied last (vLLM V0's order); the ratio test is unaffected by the earlier
            renormalization, but top-p is measured before min-p drops anything.

    Returns: [B, V] filtered logits; `logits` itself is never modified (and is returned as is when
    no row filters anything).
    """
    vocab_size = logits.shape[-1]
    keep_k = [k if 0 < k < vocab_size else vocab_size for k in top_k]
    if any(k < vocab_size for k in keep_k) or any(p < 1.0 for p in top_p):
        logits = _filter_top_k_top_p(logits, keep_k, top_p)
    if any(m > 0.0 for m in min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _check_batch(logits: torch.Tensor, states: list[SequenceSamplingState]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"expected logits [{len(states)}, V], got {list(logits.shape)}.")
    widths = {state.vocab_size for state in states}
    if widths - {logits.shape[1]}:
        raise ValueError(f"logits have V={logits.shape[1]} but states expect {sorted(widths)}.")


def _apply_logit_bias(logits: torch.Tensor, states: list[SequenceSamplingState]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, state in enumerate(states):
        rows.extend([row] * len(state.bias_ids))
        cols.extend(state.bias_ids)
        values.extend(state.bias_values)
    if rows:
        device = logits.device
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits.index_put_(index, torch.tensor(values, device=device), accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, states: list[SequenceSamplingState]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    for row, state in enumerate(states):
        if state.num_output_tokens < state.params.min_tokens:
            rows.extend([row] * len(state.min_tokens_banned_ids))
            cols.extend(state.min_tokens_banned_ids)
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = float("-inf")


def _apply_penalties(logits: torch.Tensor, states: list[SequenceSamplingState]) -> None:
    device = logits.device
    repeat_rows = [i for i, state in enumerate(states) if state.seen_mask is not None]
    if repeat_rows:
        # CTRL-style repetition penalty: shrink a seen token's logit toward zero from either side.
        index = torch.tensor(repeat_rows, device=device)
        rows = logits[index]  # [R, V]
        seen = torch.stack([states[i].seen_mask for i in repeat_rows])
        penalty = torch.tensor([states[i].params.repetition_penalty for i in repeat_rows], device=device)
        penalized = torch.where(rows > 0, rows / penalty[:, None], rows * penalty[:, None])
        logits[index] = torch.where(seen, penalized, rows)
    count_rows = [i for i, state in enumerate(states) if state.output_counts is not None]
    if count_rows:
        # OpenAI's formula: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
        index = torch.tensor(count_rows, device=device)
        counts = torch.stack([states[i].output_counts for i in count_rows]).to(torch.float32)
        frequency = torch.tensor([states[i].params.frequency_penalty for i in count_rows], device=device)
        presence = torch.tensor([states[i].params.presence_penalty for i in count_rows], device=device)
        penalty = counts * frequency[:, None] + (counts > 0) * presence[:, None]
        logits[index] = logits[index] - penalty


def _apply_grammars(logits: torch.Tensor, states: list[SequenceSamplingState]) -> None:
    # NOTE: masking only sets forbidden logits to -inf: a row whose grammar allows every token is
    # left bit-identical and consumes its generator exactly as without a grammar.
    rows = [i for i, state in enumerate(states) if state.grammar is not None]
    if rows:
        bitmask = fill_bitmask([states[i].grammar for i in rows])  # type: ignore[misc]  # filtered above
        apply_bitmask(logits, rows, bitmask)


def _sample_random(logits: torch.Tensor, states: list[SequenceSamplingState]) -> torch.Tensor:
    """Draw one token per row of `logits` [R, V] (penalties applied); returns [R] int64."""
    temperature = torch.tensor([s.params.temperature for s in states], device=logits.device)
    filtered = filter_logits(
        logits / temperature[:, None],
        [s.params.top_k for s in states],
        [s.params.top_p for s in states],
        [s.params.min_p for s in states],
    )
    probs = filtered.softmax(dim=-1)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i. Each row's
    # noise is a fresh [V] draw from its own generator, so it cannot depend on the batch.
    noise = torch.stack(
        [torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=s.generator) for s in states]
    )
    # A zero draw would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    # Stable sort: among equal logits the lower id ranks first, as argmax breaks ties.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
    device = logits.device
    rank = torch.arange(logits.shape[-1], device=device)
    sorted_logits = sorted_logits.masked_fill(
        rank[None, :] >= torch.tensor(top_k, device=device)[:, None], float("-inf")
    )
    probs = sorted_logits.softmax(dim=-1).to(torch.float64)
    # float64 so a long float32 tail cannot round the running mass past p too early.
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, dtype=torch.float64, device=device)[:, None]
    # p == 1 rows keep everything, even if rounding lets the running mass touch 1.
    drop = (mass_before >= p) & (p < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, sorted_ids, sorted_logits)


def _sampled_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                      states: list[SequenceSamplingState]) -> list[TokenLogprob | None]:
    rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * len(states)
    if not rows:
        return logprobs
    index = torch.tensor(rows, device=logits.device)
    scored = gather_logprobs(logits[index], token_ids[index], [states[i].params.logprobs or 0 for i in rows])
    for row, entry in zip(rows, scored, strict=True):
        logprobs[row] = entry
    return logprobs
