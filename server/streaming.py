"""Response plumbing shared by completions and chat: the SSE stream and the non-streaming wait.

Owns the order of a stream (chunks, the optional usage chunk, an error event if something fails
after the headers went out, `[DONE]` last, keep-alive comments while idle) and watching for a
client that leaves. What each chunk contains is the endpoint's `OutputConsumer`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from megalodon_infer.engine.outputs import RequestOutput
from server.access_log import CLIENT_CLOSED_REQUEST
from server.generation import KEEPALIVE, Generation
from server.protocol import UsageInfo
from server.sse import SSE_DONE, SSE_KEEPALIVE, SSE_MEDIA_TYPE, sse_error_event, sse_event, sse_headers

logger = logging.getLogger("megalodon.server")

T = TypeVar("T")


class OutputConsumer(Protocol):
    """Turns engine outputs into an endpoint's response: stream chunks, or one body."""

    def chunks(self, index: int, output: RequestOutput) -> list[BaseModel]:
        """Take one (merged) output of prompt `index`; return the stream chunks it makes."""

    def final_chunks(self) -> list[BaseModel]:
        """Chunks sent after the last output (the usage chunk, when asked for)."""

    def usage(self) -> UsageInfo: ...

    def response(self, finals: list[RequestOutput]) -> BaseModel:
        """The whole non-streaming response from every prompt's complete output, in prompt order."""


class StreamAssembler:
    """What the chat and completions assemblers share: the response id, and wrapping choices into
    stream chunks (with running usage when asked) plus the final usage-only chunk.

    Subclasses set `chunk_type` (the endpoint's stream response model) and implement `usage()`.
    """

    chunk_type: type[BaseModel]

    def __init__(self, response_id: str, model_name: str, stream_options: object | None) -> None:
        self.response_id = response_id
        self.model_name = model_name
        self.created = int(time.time())
        self.include_usage, self.continuous_usage = usage_options(stream_options)

    def usage(self) -> UsageInfo:
        raise NotImplementedError

    def _chunk(self, choice: BaseModel) -> BaseModel:
        return self.chunk_type(id=self.response_id, created=self.created, model=self.model_name, choices=[choice],
                               usage=self.usage() if self.continuous_usage else None)

    def final_chunks(self) -> list[BaseModel]:
        if not self.include_usage:
            return []
        return [self.chunk_type(id=self.response_id, created=self.created, model=self.model_name, choices=[],
                                usage=self.usage())]


def usage_options(stream_options: object | None) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a request's `stream_options` (vLLM's rules:
    continuous stats only together with the final usage chunk)."""
    include = bool(stream_options is not None and getattr(stream_options, "include_usage", False))
    return include, include and bool(getattr(stream_options, "continuous_usage_stats", False))


def streaming_response(
    request: Request, generation: Generation, consumer: OutputConsumer, keepalive_s: float
) -> StreamingResponse:
    """An SSE response over `generation`'s outputs; it is closed however the stream ends."""

    async def close_generation() -> None:
        # Runs even when the client left before the first chunk (the body never started).
        generation.close(client_left=True)

    return StreamingResponse(
        _sse_events(request, generation, consumer, keepalive_s),
        media_type=SSE_MEDIA_TYPE,
        headers=sse_headers(),
        background=BackgroundTask(close_generation),
    )


async def _sse_events(
    request: Request, generation: Generation, consumer: OutputConsumer, keepalive_s: float
) -> AsyncIterator[bytes]:
    try:
        async for event in generation.events(keepalive_s):
            if event is KEEPALIVE:
                yield SSE_KEEPALIVE
                continue
            for index, output in event:
                for chunk in consumer.chunks(index, output):
                    yield sse_event(chunk)
        for chunk in consumer.final_chunks():
            yield sse_event(chunk)
    except Exception as exc:
        generation.close()
        logger.warning("stream failed after it started: %s", exc, exc_info=not hasattr(exc, "status"))
        yield sse_error_event(exc)
    finally:
        # Cancellation (the client left) lands here too: abort what still runs, count the exit.
        generation.close(client_left=True)
        _report_usage(request, consumer)
    yield SSE_DONE


async def respond(request: Request, generation: Generation, consumer: OutputConsumer, stream: bool,
                  keepalive_s: float) -> Response:
    """The HTTP answer of a started generation: an SSE stream, or one JSON body once every choice has
    finished (499, logged only, when the client left first)."""
    if stream:
        return streaming_response(request, generation, consumer, keepalive_s)
    finals = await final_outputs(request, generation)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = consumer.response(finals)
    _report_usage(request, consumer)
    return JSONResponse(body.model_dump(mode="json"))


def _report_usage(request: Request, consumer: OutputConsumer) -> None:
    usage = consumer.usage()
    request.state.usage = (usage.prompt_tokens, usage.completion_tokens)


async def final_outputs(request: Request, generation: Generation) -> list[RequestOutput] | None:
    """Every choice's final output, or None when the client left first (the generation is then
    closed as a client disconnect, which the access log records as 499)."""
    try:
        finals, client_left = await until_disconnected(request, generation.final())
    except BaseException:
        generation.close()
        raise
    if client_left:
        generation.close(client_left=True)
        return None
    return finals


async def until_disconnected(request: Request, work: Awaitable[T]) -> tuple[T | None, bool]:
    """Run `work` unless the client disconnects first: `(result, False)` or `(None, True)`.

    A non-streaming handler otherwise notices a dead client only when it writes the answer
    (vLLM's `with_cancellation` runs the same race). `work` is cancelled if the client leaves.
    """
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    if job.cancelled():
        return None, True
    return job.result(), False


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
