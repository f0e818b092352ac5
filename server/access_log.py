"""Request ids, access logs and the request-size limit: ASGI middlewares around the whole app.

Owns the `X-Request-Id` header (echoed when the client sends a sane one, generated otherwise), the
request's arrival time, the one-line access log per request, and refusing bodies over the size
limit with a 413. Handlers
report token counts by setting `request.state.usage = (prompt_tokens, completion_tokens)`; the log
line is written when the response has been sent (for a stream: when it ends).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import OpenAIError

logger = logging.getLogger("megalodon.access")

REQUEST_ID_HEADER = b"x-request-id"
# The status logged for a request whose client left before the answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
# Echo only ids that are safe to put in a header and a log line.
_SANE_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


def arrival_time_of(scope: Scope) -> float:
    """When the request reached the server (`time.monotonic`): TTFT and e2e latency start here."""
    return scope.get("state", {}).get("arrival_time") or time.monotonic()


class AccessLogMiddleware:
    """Assign the request id, echo it in the response, and log the finished request."""

    def __init__(self, app: ASGIApp, *, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = time.monotonic()
        given = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), b"")
        request_id = given.decode("ascii") if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["arrival_time"] = arrival
        status: int | None = None  # set when the response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                # no response: the client left (499, set where that was seen), else the app failed (500)
                logged = status if status is not None else state.get("status", 500)
                self._log(scope, state, logged, time.monotonic() - arrival)

    @staticmethod
    def _log(scope: Scope, state: dict, status: int, seconds: float) -> None:
        client = scope.get("client")
        address = f"{client[0]}:{client[1]}" if client else "-"
        prompt_tokens, completion_tokens = state.get("usage", ("-", "-"))
        logger.info(
            '%s %s "%s %s" %d prompt_tokens=%s completion_tokens=%s latency_ms=%.1f',
            state.get("request_id", "-"),
            address,
            scope["method"],
            scope["path"],
            status,
            prompt_tokens,
            completion_tokens,
            seconds * 1000.0,
        )


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413 before the app parses them, and bodies that
    take longer than `timeout_s` to arrive with a 408.

    The body is read here (at most `max_bytes` are buffered) and replayed to the app; after the
    replay, `receive` is the server's own, so the app still learns about disconnects. A client
    that leaves while sending is logged as 499 (nginx's "client closed request"), not 500.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                error = OpenAIError(408, f"The request body did not arrive within {self.timeout_s:g} s.")
                await error.to_response()(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left while sending
                scope.setdefault("state", {})["status"] = CLIENT_CLOSED_REQUEST
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(413, f"Request body is too large; the limit is {self.max_bytes} bytes.")
        await error.to_response()(scope, receive, send)
