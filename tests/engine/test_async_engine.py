"""AsyncEngine: the model loop off the event loop, streams per request, abort on close."""

from __future__ import annotations

import asyncio

import pytest

from megalodon_infer import SamplingParams
from megalodon_infer.config import EngineConfig
from megalodon_infer.engine.async_engine import AsyncEngine
from megalodon_infer.engine.errors import EngineOverloadedError, EngineShutdownError
from megalodon_infer.engine.llm_engine import LLMEngine
from tests.engine.conftest import greedy_alone, random_prompts


@pytest.fixture
def async_engine(tiny_model):
    engine = AsyncEngine(LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                                                  max_waiting_requests=20)))
    engine.start()
    yield engine
    engine.shutdown()


async def collect(engine, prompt, params, request_id=None):
    tokens, last = [], None
    async for out in engine.generate(prompt, params, request_id):
        tokens += [t for d in out.outputs for t in d.token_ids]
        last = out
    return tokens, last


async def test_concurrent_streams_equal_each_alone(async_engine, tiny_model):
    prompts = random_prompts(12, seed=8, vocab=97)
    params = SamplingParams(temperature=0, max_tokens=9)
    results = await asyncio.gather(*(collect(async_engine, p, params) for p in prompts))
    for prompt, (tokens, last) in zip(prompts, results, strict=True):
        assert tokens == greedy_alone(tiny_model, prompt, 9)
        assert last.finished and last.outputs[-1].finish_reason == "length"


async def test_event_loop_keeps_running_while_the_model_works(async_engine):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await collect(async_engine, list(range(1, 90)), SamplingParams(temperature=0, max_tokens=40))
    task.cancel()
    assert ticks > 10


async def test_closing_the_stream_aborts_and_frees_the_slot(async_engine):
    engine = async_engine.engine
    stream = async_engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=10_000,
                                                             ignore_eos=True), "leaver")
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.aclose()
    for _ in range(200):  # within a step or two
        if engine.pool.num_free == engine.pool.num_slots and not engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.01)
    assert engine.pool.num_free == engine.pool.num_slots
    assert "leaver" not in engine.requests


async def test_cancelled_consumer_task_aborts(async_engine):
    engine = async_engine.engine
    task = asyncio.create_task(collect(async_engine, [4, 5], SamplingParams(max_tokens=30_000, ignore_eos=True),
                                       "cancelled"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        await asyncio.sleep(0.01)
    assert engine.pool.num_free == engine.pool.num_slots


async def test_overload_and_invalid_requests_raise_before_streaming(tiny_model):
    engine = AsyncEngine(LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=1, max_waiting_requests=0,
                                                                  max_num_batched_tokens=8)))
    engine.start()
    try:
        first = engine.generate([1, 2], SamplingParams(max_tokens=1000, ignore_eos=True))
        await first.__anext__()
        with pytest.raises(EngineOverloadedError):
            await engine.generate([3], SamplingParams()).__anext__()
        with pytest.raises(ValueError, match="token ids"):
            await engine.generate([10_000], SamplingParams()).__anext__()
        await first.aclose()
    finally:
        engine.shutdown()
    with pytest.raises(EngineShutdownError):
        await engine.generate([1], SamplingParams()).__anext__()


async def test_drain_finishes_in_flight_requests(async_engine):
    task = asyncio.create_task(collect(async_engine, [9, 8, 7], SamplingParams(temperature=0, max_tokens=30)))
    await asyncio.sleep(0.05)
    assert await async_engine.drain(timeout=30)
    tokens, last = await task
    assert len(tokens) == 30 and last.finished
    with pytest.raises(EngineShutdownError):
        await async_engine.generate([1], SamplingParams()).__anext__()


async def test_step_failure_ends_requests_with_an_error_not_the_engine(async_engine, tiny_model):
    engine = async_engine.engine
    original = engine.scheduler.schedule
    calls = {"n": 0}

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("scheduler bug")
        return original()

    engine.scheduler.schedule = broken_once
    tokens, last = await collect(async_engine, [1, 2, 3], SamplingParams(temperature=0, max_tokens=20))
    assert last.finished and last.error and last.outputs[-1].finish_reason == "error"
    engine.scheduler.schedule = original
    tokens, last = await collect(async_engine, [1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    assert tokens == greedy_alone(tiny_model, [1, 2, 3], 5)
    assert engine.pool.num_free == engine.pool.num_slots
