"""Log-probabilities users ask for: of sampled tokens, and of prompt tokens (for echo scoring).

Owns the one representation of a scored position (`TokenLogprob`) and the arithmetic: raw-logit
log-softmax, the chosen id's value and the top-k alternatives. Knows nothing of requests or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows of prompt logits turned into log-probabilities at once; bounds the [rows, V] temporary.
_PROMPT_LOGPROBS_BLOCK = 512

TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class TokenLogprob:
    """A scored position: the token there, its logprob under the raw model distribution and the top
    alternatives `(token_id, logprob)`, sorted by decreasing logprob.

    The first token of a prompt has nothing before it: `logprob` and `top` are None there (as in
    vLLM and OpenAI).
    """

    token_id: int
    logprob: float | None
    top: TopLogprobs | None


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprob]:
    """logits [R, V] raw, token_ids [R]: each row's chosen logprob and its top-ks[r] alternatives."""
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1).tolist()
    ids = token_ids.tolist()
    max_k = min(max(ks, default=0), logits.shape[-1])
    if max_k == 0:
        return [TokenLogprob(t, c, []) for t, c in zip(ids, chosen, strict=True)]
    top_values, top_ids = logprobs.topk(max_k, dim=-1, sorted=True)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(ids[r], chosen[r], list(zip(top_ids[r][:k], top_values[r][:k], strict=True)))
            for r, k in enumerate(ks)]


def token_logprobs(logits: torch.Tensor, target_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Logprob of `target_ids[t]` under row t, and row t's top-k, for T rows.

    Args:
        logits: [T, V] raw logits; row t is the distribution that `target_ids[t]` was drawn from.
        target_ids: T token ids.
        k: alternatives per row; 0 gives empty lists.
    """
    if logits.shape[0] != len(target_ids):
        raise ValueError(f"got {logits.shape[0]} logits rows for {len(target_ids)} target ids.")
    scored: list[TokenLogprob] = []
    for start in range(0, len(target_ids), _PROMPT_LOGPROBS_BLOCK):
        block = slice(start, start + _PROMPT_LOGPROBS_BLOCK)
        targets = torch.tensor(list(target_ids[block]), device=logits.device)
        scored.extend(gather_logprobs(logits[block], targets, [k] * len(targets)))
    return scored


class PromptLogprobsBuilder:
    """Prompt logprobs, built one prefill segment at a time (chunked prefill).

    Entry i scores `prompt_ids[i]` given the tokens before it. A segment's logits row t predicts the
    token after position start + t, so the last row of a segment scores the first token of the next
    one: the builder keeps that row ([1, V]) between segments. Any split of the prompt into segments
    gives the same entries as one pass.
    """

    def __init__(self, prompt_ids: Sequence[int], k: int) -> None:
        self.prompt_ids = prompt_ids
        self.k = k
        self.entries: list[TokenLogprob] = [TokenLogprob(prompt_ids[0], None, None)] if prompt_ids else []
        self._carry: torch.Tensor | None = None

    def add_segment(self, start: int, logits: torch.Tensor) -> None:
        """Score prompt tokens start+1 .. start+L (within the prompt). logits: [L, V] of positions start.."""
        end = start + logits.shape[0]
        rows = logits[:-1]
        targets = list(self.prompt_ids[start + 1:end])
        if start > 0:
            if self._carry is None:
                raise ValueError("segments must be added in order, from the start of the prompt")
            rows = torch.cat([self._carry, rows])
            targets = [self.prompt_ids[start], *targets]
        if targets:
            self.entries.extend(token_logprobs(rows, targets, self.k))
        self._carry = logits[-1:]

    @property
    def is_complete(self) -> bool:
        return len(self.entries) == len(self.prompt_ids)
