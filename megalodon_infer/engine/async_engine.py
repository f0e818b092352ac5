"""AsyncEngine: the engine loop on a background thread, its outputs delivered to asyncio collectors.

The model never runs on the event loop. After every step the engine thread hands that step's
outputs to each consumer loop with one `loop.call_soon_threadsafe`; on the loop, one handler
(`_deliver`) puts each output into its request's `OutputCollector` (vLLM V1's output-handler
shape). A collector merges outputs its consumer has not read yet, so a slow reader never backs the
engine up, and one collector can gather the requests of one HTTP request (several prompts). There is
no queue or task per request. Closing a consumer aborts its requests; their slots are free within
one step. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from megalodon_infer.config import EngineConfig
from megalodon_infer.core.scheduler import AddResult
from megalodon_infer.engine.errors import EngineOverloadedError, EngineShutdownError
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.engine.outputs import RequestOutput
from megalodon_infer.engine.stats import IterationStats
from megalodon_infer.sample.params import SamplingParams, StructuredOutputsParams
from megalodon_infer.tokenization.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

StepObserver = Callable[[IterationStats], None]
# The error a request still running when the server shuts down ends with.
SHUTDOWN_ERROR = "the server shut down before this request finished"


class OutputCollector:
    """The outputs of one consumer's requests, merged per request until the consumer reads them.

    Lives on one event loop: `put` is called there by the engine's output handler, `get` is awaited
    there by the consumer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.request_ids: list[str] = []
        self._pending: dict[str, list[RequestOutput]] = {}
        self._unfinished: set[str] = set()
        self._ready = asyncio.Event()

    def track(self, request_id: str) -> None:
        self.request_ids.append(request_id)
        self._unfinished.add(request_id)

    @property
    def finished(self) -> bool:
        """Every tracked request has delivered its last output (read or not)."""
        return not self._unfinished

    def put(self, output: RequestOutput) -> None:
        self._pending.setdefault(output.request_id, []).append(output)
        if output.finished:
            self._unfinished.discard(output.request_id)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> list[RequestOutput] | None:
        """Everything delivered since the last `get`, one merged output per request (in the order
        they first had news); None if nothing came within `timeout` seconds."""
        if not self._pending:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        pending, self._pending = self._pending, {}
        self._ready.clear()
        return [RequestOutput.merged(outputs) for outputs in pending.values()]

    async def final(self) -> dict[str, RequestOutput]:
        """Wait until every request has finished; each one's whole output, merged."""
        everything: dict[str, list[RequestOutput]] = {}
        while True:
            for output in await self.get() or []:
                everything.setdefault(output.request_id, []).append(output)
            if self.finished and not self._pending:
                return {rid: RequestOutput.merged(outs) for rid, outs in everything.items()}


class AsyncEngine:
    def __init__(self, engine: LLMEngine, step_observer: StepObserver | None = None) -> None:
        self.engine = engine
        self.step_observer = step_observer
        self._collectors: dict[str, OutputCollector] = {}
        self._wakeup = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ about it
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def props(self) -> dict[str, Any]:
        return self.engine.props()

    async def save_session(self, name: str, token_ids: list[int], directory: Path, cache_salt: str | None = None
                           ) -> int:
        return await asyncio.to_thread(self.engine.save_session, name, token_ids, directory, cache_salt)

    async def load_session(self, name: str, directory: Path, max_bytes: int, cache_salt: str | None = None) -> int:
        return await asyncio.to_thread(self.engine.load_session, name, directory, max_bytes, cache_salt)

    async def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile a structured-outputs constraint off the event loop (a complex schema can take a
        while); `submit` then finds it in the engine's cache. Raises ValueError for an invalid one."""
        await asyncio.to_thread(self.engine.compile_grammar, spec)

    async def cached_length(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        """How many leading tokens of `token_ids` a cached state covers (a peek: nothing is counted)."""
        return await asyncio.to_thread(self.engine.cached_length, token_ids, cache_salt)

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="megalodon-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def drain(self, timeout: float, error: str | None = SHUTDOWN_ERROR) -> bool:
        """Stop accepting requests and wait (up to `timeout` s) for in-flight ones to finish.

        Returns True if all finished. Those still running afterwards end with `error` (their
        consumers see it as an error, not a cut), and this waits a moment for that last output.
        """
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._collectors and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = not self._collectors
        for request_id in list(self._collectors):
            self.engine.abort_request(request_id, error)
        self._notify()
        deadline = time.monotonic() + 5.0
        while self._collectors and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return drained

    @property
    def num_in_flight(self) -> int:
        """Requests whose last output has not been delivered yet."""
        return len(self._collectors)

    def shutdown(self) -> None:
        self._accepting = False
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.engine.close()  # the state store's queued writes

    # ------------------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               collector: OutputCollector | None = None, arrival_time: float | None = None,
               cache_salt: str | None = None) -> OutputCollector:
        """Queue a request now; its outputs go to `collector` (a new one if None), which is returned.

        Call on the event loop that will read the collector. Raises at once, before any output
        exists, for a request that cannot start: ValueError (invalid, ContextLengthError),
        EngineOverloadedError, EngineShutdownError.
        """
        if not self._accepting or not self.is_running:
            raise EngineShutdownError("the engine is not accepting requests")
        request_id = request_id or uuid.uuid4().hex
        collector = collector or OutputCollector(asyncio.get_running_loop())
        self._collectors[request_id] = collector
        try:
            if self.engine.add_request(request_id, prompt_ids, params, arrival_time,
                                       cache_salt) is AddResult.OVERLOADED:
                raise EngineOverloadedError("the server is overloaded: too many requests are waiting")
        except BaseException:
            self._collectors.pop(request_id, None)
            raise
        collector.track(request_id)
        self._notify()
        return collector

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """One request's outputs as they come (merged when read late); refusals are raised on the first
        iteration. Closing the iterator before the request finishes aborts it."""
        collector = self.submit(prompt_ids, params, request_id)
        finished = False
        try:
            while not finished:
                for output in await collector.get() or []:
                    finished = output.finished
                    yield output
        finally:
            if not finished:  # the consumer went away (disconnect, cancellation)
                self.abort_all(collector)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._notify()

    def abort_all(self, collector: OutputCollector) -> None:
        """Abort every unfinished request of `collector` (its consumer left)."""
        for request_id in collector.request_ids:
            if self._collectors.get(request_id) is collector:
                self.engine.abort_request(request_id)
        self._notify()

    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    # ------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                outputs = self.engine.step()
            except Exception:  # noqa: BLE001 - a bug in a step must not kill the server
                logger.exception("engine step failed; aborting the affected requests")
                outputs = self.engine.fail_all("the engine failed while running this request")
            if self.step_observer is not None:
                # before delivery: a client that sees its response finds the metrics already moved
                try:
                    self.step_observer(self.engine.last_stats)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    logger.exception("step observer failed")
            self._hand_off(outputs)

    def _hand_off(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: one callback per consumer loop with this step's outputs."""
        by_loop: dict[asyncio.AbstractEventLoop, list[RequestOutput]] = {}
        for output in outputs:
            collector = self._collectors.get(output.request_id)
            if collector is not None:
                by_loop.setdefault(collector.loop, []).append(output)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the consumer's loop is closed
                for output in batch:
                    self.engine.abort_request(output.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Event loop: the one place outputs reach their collectors."""
        for output in outputs:
            collector = self._collectors.get(output.request_id)
            if collector is None:
                continue
            collector.put(output)
            if output.finished:
                del self._collectors[output.request_id]
