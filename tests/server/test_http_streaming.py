"""SSE on the wire (raw HTTP): framing, headers, usage chunks, keep-alives, and clients that leave.

A client that disconnects must abort its request and free its state slot; that is observed the
way an operator would, through /metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import httpx
import pytest
from conftest import MAX_NUM_SEQS

from tests.harness import ServerProcess, wait_until

KEEPALIVE = ": keep-alive"


def sse_events(lines: Iterable[str]) -> list[str]:
    """The events of the rest of a stream: data payloads, and comment lines as they are."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line.removeprefix("data: "))
        elif line.startswith(":"):
            events.append(line)
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def data_events(events: list[str]) -> list[dict]:
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [json.loads(event) for event in events[:-1] if not event.startswith(":")]


def stream(http: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, list[str]]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return response, sse_events(response.iter_lines())


def idle(server: ServerProcess) -> bool:
    metrics = server.metrics()
    return (metrics["megalodon:num_requests_running"] == 0 and metrics["megalodon:num_requests_waiting"] == 0
            and metrics["megalodon:state_slot_usage_perc"] == 0)


def test_completion_stream_framing_and_headers(http: httpx.Client) -> None:
    response, events = stream(http, "/v1/completions", {"prompt": "x = ", "max_tokens": 6, "ignore_eos": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache"
    chunks = data_events(events)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    # No usage chunk unless asked: genai-perf reads choices[0] of every chunk.
    assert all(chunk["choices"] and chunk["usage"] is None for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_include_usage_and_continuous_usage_stats(http: httpx.Client) -> None:
    body = {"prompt": "x = ", "max_tokens": 6, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = data_events(stream(http, "/v1/completions", body)[1])
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 6
    running = [chunk["usage"]["completion_tokens"] for chunk in chunks[:-1]]
    assert running == sorted(running) and running[-1] == 6
    # The object alone turns usage on (vLLM's default), without continuous stats.
    chunks = data_events(stream(http, "/v1/completions", {**body, "stream_options": {}})[1])
    assert chunks[-1]["choices"] == [] and all(chunk["usage"] is None for chunk in chunks[:-1])


def test_chat_stream_role_chunks_then_content_then_finish(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2, "ignore_eos": True}
    chunks = data_events(stream(http, "/v1/chat/completions", body)[1])
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[2:] if c["choices"][0]["index"] == index]
        assert all("role" not in choice["delta"] for choice in mine)
        assert [choice["finish_reason"] for choice in mine] == [None] * (len(mine) - 1) + ["length"]


def test_keepalive_comments_while_waiting_for_a_slot(server: ServerProcess, http: httpx.Client) -> None:
    blocker = {"prompt": "x", "n": MAX_NUM_SEQS, "max_tokens": 1800, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=blocker) as blocking:
        blocking_lines = blocking.iter_lines()  # kept: a discarded line iterator closes the response
        next(line for line in blocking_lines if line.startswith("data: {"))  # every slot is taken
        with http.stream("POST", "/v1/completions", json={"prompt": "y", "max_tokens": 3, "stream": True}) as queued:
            lines = queued.iter_lines()
            first = next(line for line in lines if line)
            assert first == KEEPALIVE  # the headers went out and the stream is kept alive in the queue
            blocking.close()  # frees the slots; the queued request runs
            rest = sse_events(lines)
    chunks = data_events(rest)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert wait_until(lambda: idle(server))


def test_streaming_client_that_disconnects_frees_its_slot(server: ServerProcess, http: httpx.Client) -> None:
    assert wait_until(lambda: idle(server))
    before = server.metrics()
    body = {"prompt": "def f():", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept open: a discarded line iterator closes the response
        for _ in range(3):
            next(line for line in lines if line.startswith("data: {"))
        busy = server.metrics()
        assert busy["megalodon:num_requests_running"] == 1
        assert busy["megalodon:state_slot_usage_perc"] > 0
    # Leaving the block closes the connection mid-stream.
    assert wait_until(lambda: idle(server))
    after = server.metrics()
    key = "megalodon:http_requests_client_disconnected_total"
    assert after[key] == before[key] + 1
    aborted = "megalodon:request_success_total{finished_reason=abort}"
    assert after[aborted] == before[aborted] + 1
    generated = "megalodon:generation_tokens_total"
    assert after[generated] - before[generated] < 1900


def test_non_streaming_client_that_disconnects_aborts(server: ServerProcess) -> None:
    assert wait_until(lambda: idle(server))
    before = server.metrics()
    body = {"prompt": "def f():", "max_tokens": 1900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=body, headers=server.headers, timeout=0.5)
    assert wait_until(lambda: idle(server))
    after = server.metrics()
    key = "megalodon:http_requests_client_disconnected_total"
    assert after[key] == before[key] + 1
    aborted = "megalodon:request_success_total{finished_reason=abort}"
    assert after[aborted] == before[aborted] + 1
    assert after["megalodon:generation_tokens_total"] - before["megalodon:generation_tokens_total"] < 1900
