"""The in-process ASGI server of a replica: lifespan, a request's messages, and disconnects."""

from __future__ import annotations

import asyncio

import pytest

from megalodon_cluster.asgi_bridge import ForwardedRequest, Lifespan, call_app


class EchoApp:
    """Echoes the body back in two pieces; on `/wait` it streams until the client disconnects."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.events.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = (await receive())["body"]
        headers = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-echo", headers[b"x-in"])]})
        if scope["path"] == "/wait":
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            self.events.append((await receive())["type"])
            return
        await send({"type": "http.response.body", "body": body[:2], "more_body": True})
        await send({"type": "http.response.body", "body": body[2:] + scope["query_string"], "more_body": False})


def request(path: str) -> ForwardedRequest:
    return ForwardedRequest("POST", path, b"?q", [(b"x-in", b"v")], b"hello")


async def test_lifespan_and_one_request():
    app = EchoApp()
    lifespan = Lifespan(app)
    await lifespan.startup()
    messages = [m async for m in call_app(app, request("/echo"))]
    assert messages[0] == {"type": "http.response.start", "status": 201, "headers": [(b"x-echo", b"v")]}
    assert b"".join(m.get("body", b"") for m in messages[1:]) == b"hello?q"
    await lifespan.shutdown()
    assert app.events == ["lifespan.startup", "lifespan.shutdown"]


async def test_a_caller_that_leaves_is_a_disconnect_for_the_app():
    app = EchoApp()
    stream = call_app(app, request("/wait"))
    assert (await stream.__anext__())["status"] == 201
    assert (await stream.__anext__())["body"] == b"first"
    await stream.aclose()
    assert app.events == ["http.disconnect"]


async def test_an_app_that_fails_is_reported_to_the_caller():
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        [m async for m in call_app(broken, request("/x"))]
    failing = Lifespan(lambda scope, receive, send: send({"type": "lifespan.startup.failed", "message": "no"}))
    with pytest.raises(RuntimeError, match="no"):
        await asyncio.wait_for(failing.startup(), 5)
