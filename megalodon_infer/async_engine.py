"""AsyncEngine: the engine loop on a background thread, one asyncio stream per request.

The model never runs on the event loop. Outputs cross to asyncio through
`loop.call_soon_threadsafe` into per-request queues. Closing a request's iterator (a client that
went away) aborts it, and its slot is free within one step. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from .engine import EngineStats, LLMEngine
from .errors import EngineOverloadedError, EngineShutdownError
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .scheduler import AddResult

logger = logging.getLogger(__name__)

StepObserver = Callable[[EngineStats, list[RequestOutput]], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, step_observer: StepObserver | None = None) -> None:
        self.engine = engine
        self.step_observer = step_observer
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._wakeup = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.errored: BaseException | None = None

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="megalodon-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting requests and wait (up to `timeout` s) for in-flight ones to finish.

        Returns True if all finished; those still running afterwards are aborted.
        """
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._queues and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = not self._queues
        for request_id in list(self._queues):
            self.abort(request_id)
        return drained

    def shutdown(self) -> None:
        self._accepting = False
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request now and return its stream of outputs (iterate it on the event loop).

        Raises at once, before any output exists, for a request that cannot start: ValueError (invalid,
        ContextLengthError), EngineOverloadedError, EngineShutdownError. Closing the stream before the
        request finishes aborts it.
        """
        if not self._accepting or not self.is_running:
            raise EngineShutdownError("the engine is not accepting requests")
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = (loop, queue)
        try:
            if self.engine.add_request(request_id, prompt_ids, params) is AddResult.OVERLOADED:
                raise EngineOverloadedError("the server is overloaded: too many requests are waiting")
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._notify()
        return self._stream(request_id, queue)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """`submit` and iterate in one: refusals are raised on the first iteration."""
        async for output in self.submit(prompt_ids, params, request_id):
            yield output

    async def _stream(self, request_id: str, queue: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # the consumer went away (disconnect, cancellation)
                self.engine.abort_request(request_id)
                self._notify()

    def abort(self, request_id: str) -> None:
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
            except Exception as exc:  # noqa: BLE001 - a bug in a step must not kill the server
                logger.exception("engine step failed; aborting the affected requests")
                self.errored = exc
                outputs = self.engine.fail_all(str(exc))
            if self.step_observer is not None:
                # before dispatch: a client that sees its response finds the metrics already moved
                try:
                    self.step_observer(self.engine.stats(), outputs)
                except Exception:  # noqa: BLE001 - metrics must never break serving
                    logger.exception("step observer failed")
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            target = self._queues.get(output.request_id)
            if target is None:
                continue
            loop, queue = target
            try:
                loop.call_soon_threadsafe(queue.put_nowait, output)
            except RuntimeError:  # the consumer's loop is closed
                self.engine.abort_request(output.request_id)
