"""The front deployment: Ray Serve's HTTP ingress, which picks each request's conversation key and
hands the request to an engine replica.

The proxy gives the front the whole HTTP request; the front reads the body (up to the server's
`max_request_bytes`), takes the key (`routing.routing_key`: `X-Session-Id`, the body's `user`, a
Responses `previous_response_id`) and calls the engine deployment with
`options(session_id=key)`, which `SessionAffineRouter` turns into a replica. The answer streams
back as it comes. A call that fails because its replica died before answering (its process
killed, its node lost) is sent again, to another replica, up to `retries` times: nothing has
reached the client yet, and the conversation's state is in the state store, so the client only
sees a slower answer. Nothing here authenticates or validates: the app on the replica does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from megalodon_cluster.asgi_bridge import ForwardedRequest
from megalodon_cluster.routing import ResponseKeys, routing_key

logger = logging.getLogger("megalodon.cluster")

RETRY_BACKOFF_S = 0.25
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp[_-][A-Za-z0-9_-]+)"')
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade"}
_REPLICA_LOST = (RayActorError, ActorUnavailableError)


def error(status: int, message: str, kind: str) -> JSONResponse:
    """An error in the server's OpenAI shape, for what the front itself refuses."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


class Front:
    def __init__(self, engine: DeploymentHandle, max_request_bytes: int, retries: int = 3) -> None:
        self.engine = engine
        self.max_request_bytes = max_request_bytes
        self.retries = retries
        self.responses = ResponseKeys()

    async def __call__(self, request: Request) -> Response:
        try:
            body = await self._body(request)
        except ClientDisconnect:
            return Response(status_code=499)
        if body is None:
            return error(413, f"The request body is larger than {self.max_request_bytes} bytes.",
                         "invalid_request_error")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.scope["headers"]}
        key = routing_key(headers, body, self.responses)
        forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                     list(request.scope["headers"]), body, request.scope.get("client"))
        handle = self.engine.options(stream=True, **({"session_id": key} if key else {}))
        try:
            stream, (status, response_headers) = await self._first(handle, forwarded)
        except _REPLICA_LOST as exc:
            logger.warning("no replica could answer %s %s: %s", request.method, request.url.path, exc)
            return error(503, "No replica could answer this request; retry shortly.", "service_unavailable")
        kept = {k: v for k, v in response_headers if k.lower() not in _HOP_BY_HOP}
        pieces = self._relay(stream, key if request.url.path.startswith("/v1/responses") else None)
        return StreamingResponse(pieces, status_code=status, headers=kept)

    async def _body(self, request: Request) -> bytes | None:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_request_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def _first(self, handle: DeploymentHandle, forwarded: ForwardedRequest
                     ) -> tuple[DeploymentResponseGenerator, Any]:
        """Start the call and wait for the status line, retrying while no replica has answered."""
        for attempt in range(self.retries + 1):
            stream = handle.handle.remote(forwarded)
            try:
                return stream, await stream.__anext__()
            except _REPLICA_LOST:
                if attempt == self.retries:
                    raise
                logger.warning("replica lost before answering; retrying (%d of %d)", attempt + 1, self.retries)
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))  # the router drops the dead replica meanwhile
        raise AssertionError("unreachable")

    async def _relay(self, stream: DeploymentResponseGenerator, responses_key: str | None) -> AsyncIterator[bytes]:
        first = True
        try:
            async for piece in stream:
                if first and responses_key is not None:
                    # NOTE: the next turn names this response; it should route like this one did.
                    match = _RESPONSE_ID.search(piece)
                    if match is not None:
                        self.responses.remember(match.group(1).decode(), responses_key)
                first = False
                yield piece
        except _REPLICA_LOST:
            # Bytes have reached the client: the answer cannot be resent, only cut (as a server crash would).
            logger.warning("replica lost while streaming a response")
