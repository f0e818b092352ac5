"""A bounded storm: 64 concurrent streams, a third of them abandoned mid-stream. Afterwards nothing
runs or waits, every slot is free, and every finished stream equals its prompt run alone."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import ServerProcess, running_server, wait_until

NUM_STREAMS = 64
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def storm_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("storm") / "server.log"
    with running_server(model_dir, log, ["--max-num-seqs", "16"]) as process:
        yield process


async def stream(client: httpx.AsyncClient, prompt: str, leave_after: int | None) -> str | None:
    """The streamed text, or None when this client leaves after `leave_after` chunks."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    text, chunks = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            text.append(json.loads(line[6:])["choices"][0]["text"])
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return None  # closing the stream here is the disconnect
    return "".join(text)


@pytest.mark.slow
def test_a_storm_with_disconnects_leaves_nothing_behind_and_no_cross_talk(storm_server: ServerProcess) -> None:
    rng = random.Random(7)
    prompts = [f"def function_{i}(value_{i}):\n    " for i in range(NUM_STREAMS)]
    leave = [rng.randint(1, 6) if rng.random() < 0.35 else None for _ in prompts]

    async def storm() -> list[str | None]:
        async with httpx.AsyncClient(base_url=storm_server.base_url, timeout=300) as client:
            return await asyncio.gather(*(stream(client, p, k) for p, k in zip(prompts, leave, strict=True)))

    results = asyncio.run(storm())
    assert sum(r is None for r in results) == sum(k is not None for k in leave) > 10

    def idle() -> bool:
        m = storm_server.metrics()
        return (m["megalodon:num_requests_running"], m["megalodon:num_requests_waiting"],
                m["megalodon:state_slot_usage_perc"]) == (0, 0, 0)

    assert wait_until(idle, timeout_s=60)
    assert storm_server.metrics()["megalodon:request_success_total{finished_reason=abort}"] >= 10
    with httpx.Client(base_url=storm_server.base_url, timeout=120) as client:
        for prompt, result in zip(prompts, results, strict=True):
            if result is None:
                continue
            alone = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                         "ignore_eos": True}).json()["choices"][0]["text"]
            assert result == alone, prompt
