"""What the engine hands back for a request after a step: deltas per choice, in plain Python.

An output carries what changed since the previous one; `RequestOutput.merge` folds later deltas into
an earlier one, so a consumer that reads less often than the engine steps (a slow client, a
non-streaming response) gets the same tokens and text in fewer, larger pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megalodon_infer.sample.logprobs import TokenLogprob


@dataclass
class CompletionOutput:
    """The new part of one choice: tokens and text produced since the previous output."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the choice

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of a request's life, for latency metrics.

    arrival_time: when the request reached the server (or the engine, for direct callers);
    queued_time: when the engine queued it.
    """

    arrival_time: float
    queued_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """One step's news about a request. `outputs` lists the choices that changed."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprob] | None = None  # sent once, when the prompt is complete
    num_cached_tokens: int = 0
    error: str | None = None

    @staticmethod
    def merged(outputs: Sequence[RequestOutput]) -> RequestOutput:
        """The outputs of one request, oldest first, as one: every choice's deltas concatenated, the
        latest status (finished, error, timestamps, cached tokens) kept. Costs O(total size)."""
        first = outputs[0]
        if len(outputs) == 1:
            return first
        parts: dict[int, list[CompletionOutput]] = {}
        for output in outputs:
            for delta in output.outputs:
                parts.setdefault(delta.index, []).append(delta)
        last = outputs[-1]
        return RequestOutput(
            request_id=first.request_id, prompt_token_ids=first.prompt_token_ids,
            outputs=[_join(deltas) for _, deltas in sorted(parts.items())], finished=last.finished,
            metrics=last.metrics, num_cached_tokens=last.num_cached_tokens,
            prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None),
            error=next((o.error for o in reversed(outputs) if o.error is not None), None))


def _join(deltas: list[CompletionOutput]) -> CompletionOutput:
    logprobs = None
    if any(d.logprobs is not None for d in deltas):
        logprobs = [lp for d in deltas for lp in d.logprobs or ()]
    last = deltas[-1]
    return CompletionOutput(index=last.index, token_ids=[t for d in deltas for t in d.token_ids],
                            text="".join(d.text for d in deltas), logprobs=logprobs,
                            finish_reason=last.finish_reason, stop_reason=last.stop_reason)
