"""One HTTP request's engine requests: start, merge, keep alive, abort, and count in the metrics.

Owns the bridge between a handler and `AsyncEngine`: a request with several prompts becomes one
engine request per prompt, whose outputs are merged into one stream tagged with the prompt index;
engine refusals become OpenAI errors before any byte is sent; a client that leaves aborts every
engine request of its HTTP request; per-request latencies go to `Metrics`. Knows nothing of the
JSON shapes of responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from megalodon_infer.async_engine import AsyncEngine
from megalodon_infer.errors import ContextLengthError, EngineOverloadedError, EngineShutdownError
from megalodon_infer.outputs import RequestMetrics, RequestOutput
from megalodon_infer.sampling_params import SamplingParams
from server.errors import (
    OpenAIError,
    context_length_message,
    invalid_request,
    overloaded,
    prompt_too_long_message,
    service_unavailable,
)
from server.metrics import Metrics

logger = logging.getLogger("megalodon.server")

# The event `GenerationGroup.events` yields when nothing happened for a keep-alive interval.
KEEPALIVE = None
ENGINE_FAILED_MESSAGE = "The engine failed while generating this request; it was stopped."


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def engine_error(exc: BaseException) -> OpenAIError:
    """The client-facing error for an engine refusal raised before the first output."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ContextLengthError):
        if exc.max_tokens and exc.num_prompt_tokens + exc.max_tokens > exc.max_model_len:
            message = context_length_message(max_model_len=exc.max_model_len, num_prompt_tokens=exc.num_prompt_tokens,
                                             max_tokens=exc.max_tokens)
        else:
            message = prompt_too_long_message(max_model_len=exc.max_model_len,
                                              num_prompt_tokens=exc.num_prompt_tokens)
        return invalid_request(message, param="input_tokens", code="context_length_exceeded")
    if isinstance(exc, EngineOverloadedError):
        return overloaded("The server is overloaded: too many requests are waiting; retry later.")
    if isinstance(exc, EngineShutdownError):
        return service_unavailable("The server is shutting down and accepts no new requests.")
    if isinstance(exc, ValueError):
        return invalid_request(str(exc))
    return OpenAIError(500, "Internal server error.")


class _RequestRecorder:
    """Latency metrics of one engine request, from the outputs its handler receives.

    TTFT is measured from the server's arrival time (tokenization included, as in vLLM) to the
    engine's first-token time; inter-token latency is the gap between outputs as the server sees
    them; queue, prefill and decode come from the engine's timestamps.
    """

    def __init__(self, metrics: Metrics, arrival: float, params: SamplingParams, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.params = params
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generation_tokens = 0
        self.last_output_at: float | None = None
        self.reasons: set[str] = set()
        self.finished = False
        self.engine_times: RequestMetrics | None = None  # the engine's timestamps, once seen

    def on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        self.engine_times = output.metrics
        num_tokens = sum(len(delta.token_ids) for delta in output.outputs)
        if num_tokens:
            if self.last_output_at is None and output.metrics.first_token_time is not None:
                self.metrics.observe_ttft(max(0.0, output.metrics.first_token_time - self.arrival))
            elif self.last_output_at is not None:
                self.metrics.observe_inter_token_latency(now - self.last_output_at)
            self.last_output_at = now
            self.num_generation_tokens += num_tokens
        self.reasons.update(delta.finish_reason for delta in output.outputs if delta.finish_reason)
        if output.error is not None:
            self.reasons.add("error")
        if output.finished:
            self._finish()

    def abort(self) -> None:
        if not self.finished:
            self.reasons.add("abort")
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        now = time.monotonic()
        times = self.engine_times
        scheduled = times.first_scheduled_time if times is not None else None
        first_token = times.first_token_time if times is not None else None
        finished = (times.finished_time if times is not None else None) or now
        queued_since = times.arrival_time if times is not None else self.arrival
        reason = next((r for r in ("error", "abort", "length", "stop") if r in self.reasons), "stop")
        self.metrics.on_request_finished(
            finished_reason=reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            e2e_latency_s=max(0.0, finished - self.arrival),
            queue_time_s=max(0.0, (scheduled or finished) - queued_since),
            prefill_time_s=0.0 if scheduled is None else max(0.0, (first_token or finished) - scheduled),
            decode_time_s=0.0 if first_token is None else max(0.0, finished - first_token),
            max_tokens=self.params.max_tokens,
            n=self.params.n,
        )


class GenerationGroup:
    """The engine requests of one HTTP request, read as one stream of `(prompt_index, output)`."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, arrival: float) -> None:
        self.engine = engine
        self.metrics = metrics
        self.arrival = arrival
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._request_ids: list[str] = []
        self._recorders: list[_RequestRecorder] = []
        self._closed = False

    async def start(self, requests: Sequence[EngineRequest]) -> None:
        """Submit every request; raise the `OpenAIError` of the first refusal (and abort the rest).

        `AsyncEngine.submit` validates and queues each request synchronously, so a refusal is known
        here, before anything is sent: that is what lets a stream answer 400/429 before its headers.
        """
        for index, request in enumerate(requests):
            try:
                outputs = self.engine.submit(request.prompt_ids, request.params, request.request_id)
            except Exception as exc:
                self.close(record=False)
                raise engine_error(exc) from None
            self._request_ids.append(request.request_id)
            self._pumps.append(asyncio.create_task(self._pump(index, outputs)))
            self._recorders.append(
                _RequestRecorder(self.metrics, self.arrival, request.params, len(request.prompt_ids)))

    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in outputs:
                self._queue.put_nowait((index, output))
        except Exception as exc:  # the reader raises it; cancellation (a BaseException) passes
            self._queue.put_nowait((index, exc))
            raise

    @property
    def finished(self) -> bool:
        return all(recorder.finished for recorder in self._recorders)

    async def events(self, keepalive_s: float | None = None) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        """Outputs of every request as they come, until all have finished. Yields `KEEPALIVE`
        after `keepalive_s` seconds without news (never, if None). Raises the first failure (an
        engine failure as a 500 whose message reveals no internals)."""
        while not self.finished:
            try:
                index, item = await asyncio.wait_for(self._queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield KEEPALIVE
                continue
            if isinstance(item, BaseException):
                raise item
            self._recorders[index].on_output(item)
            if item.error is not None:
                logger.error("request %s failed in the engine: %s", item.request_id, item.error)
                raise OpenAIError(500, ENGINE_FAILED_MESSAGE)
            yield index, item

    def close(self, *, client_left: bool = False, record: bool = True) -> None:
        """Abort every request that has not finished (idempotent). `client_left` counts a client
        disconnect if anything was still running; `record` counts those requests as aborted."""
        if self._closed:
            return
        self._closed = True
        unfinished = [i for i, recorder in enumerate(self._recorders) if not recorder.finished]
        for pump in self._pumps:
            if not pump.done():
                pump.cancel()
            pump.add_done_callback(_retrieve_exception)
        for request_id in self._request_ids:
            # explicit: a stream cancelled before it first ran never reaches its own cleanup
            self.engine.abort(request_id)
        if client_left and unfinished:
            self.metrics.on_client_disconnect()
        if record:
            for index in unfinished:
                self._recorders[index].abort()


def _retrieve_exception(task: asyncio.Task[None]) -> None:
    # Marks the exception as seen, so asyncio does not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()
