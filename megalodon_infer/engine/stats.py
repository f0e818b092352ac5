"""What one engine step did, for metrics: plain numbers, computed on the engine thread.

The server's metrics layer turns an `IterationStats` into Prometheus samples; nothing here knows
Prometheus. Latencies follow vLLM's definitions (seconds, `time.monotonic`): TTFT from the
request's arrival to its first token, inter-token latency between a request's consecutive steps
with new tokens, queue time from queued to first scheduled, prefill from scheduled to first token,
decode from first token to finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megalodon_infer.engine.request import Request


@dataclass(frozen=True)
class FinishedRequestStats:
    finish_reason: str  # the most serious of its choices': error > abort > length > stop
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency_s: float
    queue_time_s: float
    prefill_time_s: float
    decode_time_s: float
    max_tokens: int | None
    n: int

    @classmethod
    def of(cls, request: Request, now: float) -> FinishedRequestStats:
        m = request.metrics
        finished = m.finished_time or now
        scheduled, first_token = m.first_scheduled_time, m.first_token_time
        return cls(
            finish_reason=request.finish_reason,
            num_prompt_tokens=len(request.prompt_ids),
            num_generation_tokens=sum(len(c.output_ids) for c in request.choices),
            e2e_latency_s=max(0.0, finished - m.arrival_time),
            queue_time_s=max(0.0, (scheduled or finished) - m.queued_time),
            prefill_time_s=0.0 if scheduled is None else max(0.0, (first_token or finished) - scheduled),
            decode_time_s=0.0 if first_token is None else max(0.0, finished - first_token),
            max_tokens=request.params.max_tokens,
            n=request.params.n,
        )


@dataclass
class PrefixCacheStats:
    """Prefix-cache activity during the step (counts) and its size after it (gauges)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    stored_bytes: int = 0
    num_entries: int = 0


@dataclass
class IterationStats:
    """One step: queue and slot gauges after it, tokens it processed, latencies it completed."""

    num_running: int = 0
    num_waiting: int = 0
    slot_usage: float = 0.0
    num_prompt_tokens: int = 0  # prompt tokens computed by the step
    num_generation_tokens: int = 0  # tokens sampled by the step
    time_to_first_tokens_s: list[float] = field(default_factory=list)
    inter_token_latencies_s: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    prefix_cache: PrefixCacheStats | None = None  # None when the cache is off
