"""Serving the FastAPI app inside a Ray Serve replica: its lifespan, and one HTTP request at a time.

Each engine replica runs the very app `megalodon-serve` runs (`server.app.build_app`), with no
socket of its own: the front hands it a request (method, path, headers, body) through a deployment
handle, and this module plays the ASGI server's part, yielding the messages the app sends. A caller
that goes away (the client disconnected, so Ray cancelled the call) is reported to the app as
`http.disconnect`, which aborts the generation like any disconnect. Knows nothing of Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

ASGI = {"version": "3.0", "spec_version": "2.3"}
# After the caller left, how long the app may take to notice the disconnect and end on its own.
DISCONNECT_GRACE_S = 5.0
_DONE = object()


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the front received it; `headers` as ASGI has them (lower-case names)."""

    method: str
    path: str
    query_string: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": ASGI, "http_version": "1.1", "method": self.method, "scheme": "http",
                "path": self.path, "raw_path": self.path.encode(), "root_path": "", "query_string": self.query_string,
                "headers": [tuple(pair) for pair in self.headers], "client": self.client,
                "server": ("127.0.0.1", 0), "state": {}}


class Lifespan:
    """The app's ASGI lifespan (startup, then shutdown), run on the current event loop."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI, "state": {}}
        self._task = asyncio.get_running_loop().create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._expect("startup")

    async def shutdown(self, timeout: float = 60.0) -> None:
        if self._task is None or self._task.done():
            return
        await asyncio.wait_for(self._expect("shutdown"), timeout)
        await asyncio.wait_for(self._task, timeout)

    async def _expect(self, phase: str) -> None:
        await self._to_app.put({"type": f"lifespan.{phase}"})
        message = await self._from_app.get()
        if message["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"the app's lifespan {phase} failed: {message.get('message', message['type'])}")


async def call_app(app: Any, request: ForwardedRequest) -> AsyncIterator[dict[str, Any]]:
    """Run `request` through the ASGI `app`; yields each message the app sends, in order.

    Closing the iterator early (the caller left) tells the app its client disconnected.
    """
    outbox: asyncio.Queue[Any] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal body_delivered
        if not body_delivered:
            body_delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    task = asyncio.get_running_loop().create_task(app(request.scope(), receive, outbox.put))
    task.add_done_callback(lambda _: outbox.put_nowait(_DONE))
    try:
        while (message := await outbox.get()) is not _DONE:
            yield message
        task.result()  # an exception the app let escape
    finally:
        disconnected.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE_S)
            task.cancel()
