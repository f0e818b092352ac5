"""The server process around the app: listening, read deadlines, and the drain on SIGTERM.

Owns what happens outside a handler:
- the listening socket, bound before anything starts, so a port in use is one clear line and exit 1;
- header and body read deadlines, so a client that sends a request slowly (or never finishes it)
  cannot hold a connection open forever: 408 and the connection closed;
- the drain: on the first SIGTERM (or Ctrl-C) the server keeps listening and answers every new
  request with 503 and Retry-After, lets the requests in flight finish for up to `--drain-timeout`
  seconds, ends the rest with an error their clients see (an SSE error event then `[DONE]`, or a
  503 body), and only then stops uvicorn. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import OpenAIError
from server.state import ServerState

logger = logging.getLogger("megalodon.server")

# Answered during a drain too: scrapes and version checks are not new work.
DRAIN_OPEN_PATHS = frozenset({"/metrics", "/version"})
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class PortInUseError(OSError):
    """The address to listen on is taken (or not ours to take)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or PortInUseError saying why not (before any thread starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise PortInUseError(f"{host}:{port} {why}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class DrainMiddleware:
    """503 with Retry-After for every new request once the server drains."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.state.draining and scope["path"] not in DRAIN_OPEN_PATHS:
            error = OpenAIError(503, "The server is shutting down and accepts no new requests.", retry_after=5)
            await error.to_response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def deadline_protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with a deadline on receiving each request's headers.

    uvicorn times out idle keep-alive connections but not a request whose headers arrive slowly
    or never complete (a connection held open by a slow or malicious client); this closes such a
    connection with 408 after `header_timeout` seconds.
    """

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.write(REQUEST_TIMEOUT)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # until the first request's headers are complete

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn, with the drain (module docstring) in front of its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining and self._loop is not None and not self.should_exit:
            self._draining = True
            self._captured_signals.append(sig)
            # a signal handler runs between two bytecodes of the loop's thread: hand the drain to the loop
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)  # a second signal: stop now
        if sig == signal.SIGTERM:
            self.force_exit = True

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        logger.info("draining: new requests get 503; in-flight ones have %.0f s to finish", self.drain_timeout)
        await self.state.drain(self.drain_timeout)
        await asyncio.sleep(0.2)  # the last error events and [DONE]s leave the handlers
        self.should_exit = True
