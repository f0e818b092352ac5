"""One HTTP request's engine requests: start them, read their outputs, abort them, map refusals.

Owns the bridge between a handler and `AsyncEngine`: a request with several prompts becomes one
engine request per prompt, all delivering into one `OutputCollector`, read back tagged with the
prompt index; engine refusals become OpenAI errors before any byte is sent (the one place engine
errors are mapped to HTTP); a client that leaves aborts every engine request of its HTTP request.
Knows nothing of the JSON shapes of responses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from megalodon_infer.engine.async_engine import SHUTDOWN_ERROR, AsyncEngine, OutputCollector
from megalodon_infer.engine.errors import ContextLengthError, EngineOverloadedError, EngineShutdownError
from megalodon_infer.engine.outputs import RequestOutput
from megalodon_infer.sample.params import SamplingParams
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

# The event `Generation.events` yields when nothing happened for a keep-alive interval.
KEEPALIVE = None
ENGINE_FAILED_MESSAGE = "The engine failed while generating this request; it was stopped."


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None  # the prefix-cache namespace (server.tenancy.cache_salt)


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
        return invalid_request(str(exc), param=getattr(exc, "param", None))
    return OpenAIError(500, "Internal server error.")


async def compile_constraints(engine: AsyncEngine, requests: Sequence[EngineRequest], param: str | None) -> None:
    """Compile the requests' structured-outputs constraints off the event loop, so admission finds
    them compiled; an invalid schema or grammar is a 400 (naming `param`) here, before anything is sent."""
    for spec in {r.params.structured_outputs for r in requests if r.params.structured_outputs is not None}:
        try:
            await engine.compile_grammar(spec)
        except Exception as exc:
            error = engine_error(exc)
            if error.status == 400 and error.param is None:
                error.param = param
            raise error from None


class Generation:
    """The engine requests of one HTTP request, read as `(prompt_index, output)` pairs."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, arrival: float) -> None:
        self.engine = engine
        self.metrics = metrics
        self.arrival = arrival
        self._collector = OutputCollector(asyncio.get_running_loop())
        self._index: dict[str, int] = {}
        self._closed = False

    def start(self, requests: Sequence[EngineRequest]) -> None:
        """Submit every request; raise the `OpenAIError` of the first refusal (and abort the rest).

        `AsyncEngine.submit` validates and queues each request synchronously, so a refusal is known
        here, before anything is sent: that is what lets a stream answer 400/429 before its headers.
        A request that needs more sequences than the server can ever hold at once (slots plus the
        waiting queue) is a 400, not a 429 a retrying client would repeat forever.
        """
        config = self.engine.config
        capacity = config.max_num_seqs + config.max_waiting_requests
        needed = sum(request.params.n for request in requests)
        if needed > capacity:
            raise invalid_request(
                f"This request needs {needed} sequences (prompts x n) but the server can hold at most {capacity} "
                f"at once ({config.max_num_seqs} state slots + {config.max_waiting_requests} waiting); split it.",
                param="prompt")
        for index, request in enumerate(requests):
            try:
                self.engine.submit(request.prompt_ids, request.params, request.request_id,
                                   collector=self._collector, arrival_time=self.arrival, cache_salt=request.cache_salt)
            except Exception as exc:
                self.close()
                raise engine_error(exc) from None
            self._index[request.request_id] = index

    @property
    def finished(self) -> bool:
        return self._collector.finished

    async def events(self, keepalive_s: float | None = None) -> AsyncIterator[list[tuple[int, RequestOutput]] | None]:
        """What every request produced since the last event, until all have finished. Yields
        `KEEPALIVE` after `keepalive_s` seconds without news (never, if None). Raises a 500 whose
        message reveals no internals if the engine failed a request."""
        while not self.finished:
            outputs = await self._collector.get(keepalive_s)
            if outputs is None:
                yield KEEPALIVE
                continue
            self._check(outputs)
            yield [(self._index[output.request_id], output) for output in outputs]

    async def final(self) -> list[RequestOutput]:
        """Every request's whole output (merged), in prompt order, once all have finished."""
        finals = await self._collector.final()
        self._check(list(finals.values()))
        return [finals[request_id] for request_id in self._index]

    def _check(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.error == SHUTDOWN_ERROR:
                raise service_unavailable("The server shut down before this request finished; retry it.")
            if output.error is not None:
                logger.error("request %s failed in the engine: %s", output.request_id, output.error)
                raise OpenAIError(500, ENGINE_FAILED_MESSAGE)

    def close(self, *, client_left: bool = False) -> None:
        """Abort every request that has not finished (idempotent). `client_left` counts a client
        disconnect if anything was still running."""
        if self._closed:
            return
        self._closed = True
        if client_left and not self.finished:
            self.metrics.on_client_disconnect()
        self.engine.abort_all(self._collector)
