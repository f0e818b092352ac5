"""What the engine hands back for a request after each step: deltas per choice, in plain Python."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import PromptLogprobs


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob (under the raw model distribution) and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


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
    """Wall-clock timestamps (time.monotonic seconds) of a request's life, for latency metrics."""

    arrival_time: float
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
    prompt_logprobs: PromptLogprobs | None = None  # sent once, when the prompt is complete
    num_cached_tokens: int = 0
    error: str | None = None
