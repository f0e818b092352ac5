"""The server's runtime state: the model being loaded or served, and the checks every route needs.

Owns loading the model on a background thread (so `/health` can answer 503 meanwhile), starting
and stopping the `AsyncEngine`, the step observer that feeds the scheduler metrics, and the common
guards: "is the model ready", "is this our model", "is there a tokenizer". Knows nothing of the
wire format beyond raising `OpenAIError`s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from megalodon_infer.config import MAX_POSITION
from megalodon_infer.engine.async_engine import AsyncEngine
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.engine.stats import IterationStats
from megalodon_infer.tokenization.tokenizer import Tokenizer
from server.errors import invalid_request, model_not_found, service_unavailable
from server.metrics import Metrics
from server.settings import ServerSettings

logger = logging.getLogger("megalodon.server")

EngineFactory = Callable[[ServerSettings], LLMEngine]
# Seconds to wait for the engine's own bookkeeping at shutdown, after uvicorn has already waited
# (up to drain_timeout) for the responses in flight.
_FINAL_DRAIN_S = 2.0


def load_engine(settings: ServerSettings) -> LLMEngine:
    """The default engine factory: the checkpoint directory named by the settings."""
    return LLMEngine.from_config(settings.engine_config())


@dataclass(frozen=True)
class ModelInfo:
    """What the routes need to know about the loaded model."""

    max_model_len: int
    num_slots: int


class ServerState:
    """One model, loaded in the background; shared by every request of the app."""

    def __init__(self, settings: ServerSettings, metrics: Metrics, engine_factory: EngineFactory,
                 on_fatal: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.model_name
        self._engine_factory = engine_factory
        self._on_fatal = on_fatal
        self.engine: AsyncEngine | None = None  # set once the model is loaded and the loop runs
        self.tokenizer: Tokenizer | None = None
        self.info: ModelInfo | None = None
        self.load_error: str | None = None
        self._loader: threading.Thread | None = None
        self.draining = False  # set on SIGTERM: new requests get 503 while in-flight ones finish

    # ------------------------------------------------------------------------------ lifecycle
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="megalodon-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            llm = self._engine_factory(self.settings)
            self.info = ModelInfo(max_model_len=llm.config.max_model_len or MAX_POSITION,
                                  num_slots=llm.config.max_num_seqs)
            self._set_info_metrics(llm)
            engine = AsyncEngine(llm, step_observer=self._on_step)
            engine.start()
        except Exception as exc:  # noqa: BLE001 - reported on /health and ends the process
            # one line for the operator (the CLI prints it again as it exits 1); the traceback at debug level
            logger.error("loading the model from %s failed: %s", self.settings.model, exc)
            logger.debug("loading the model failed", exc_info=True)
            self.load_error = f"{type(exc).__name__}: {exc}"
            if self._on_fatal is not None:
                self._on_fatal()
            return
        self.tokenizer = llm.tokenizer
        self.engine = engine  # published last: from here on requests are accepted
        logger.info("model %s loaded from %s (%d state slots, %s)%s", self.model_name,
                    self.settings.model, self.info.num_slots,
                    f"max_model_len {llm.config.max_model_len}" if llm.config.max_model_len else "no context cap",
                    "" if self.tokenizer else "; no tokenizer: token-id prompts only")

    def _set_info_metrics(self, llm: LLMEngine) -> None:
        props = llm.props()
        config = llm.model.config
        self.metrics.set_cache_config_info(
            num_state_slots=props["num_state_slots"], bytes_per_slot=props["bytes_per_slot"],
            chunk_size=props["chunk_size"], enable_prefix_caching=props["prefix_cache"]["enabled"],
            prefix_cache_bytes=props["prefix_cache"]["device_bytes"],
            prefix_cache_host_bytes=props["prefix_cache"]["host_bytes"])
        self.metrics.set_model_config_info(
            served_model_name=self.model_name, max_model_len=props["max_model_len"] or "none",
            dtype=self.settings.dtype, device=self.settings.device, num_layers=config.num_layers,
            model_dim=config.model_dim, vocab_size=config.vocab_size,
            max_num_seqs=props["max_num_seqs"], max_num_batched_tokens=props["max_num_batched_tokens"])

    def _on_step(self, stats: IterationStats) -> None:
        """Engine thread, after every step: the step's numbers into Prometheus."""
        metrics = self.metrics
        cache = stats.prefix_cache
        if cache is not None:
            metrics.on_prefix_cache_lookup(num_queried_tokens=cache.queried_tokens, num_hit_tokens=cache.hit_tokens)
            metrics.set_prefix_cache_usage(stored_bytes=cache.stored_bytes, new_evictions=cache.evictions)
        metrics.set_scheduler_stats(stats.num_running, stats.num_waiting, stats.slot_usage,
                                    num_checkpoints=None if cache is None else cache.num_entries)
        metrics.on_step(num_prompt_tokens=stats.num_prompt_tokens, num_generation_tokens=stats.num_generation_tokens)
        for seconds in stats.time_to_first_tokens_s:
            metrics.observe_ttft(seconds)
        for seconds in stats.inter_token_latencies_s:
            metrics.observe_inter_token_latency(seconds)
        for done in stats.finished_requests:
            metrics.on_request_finished(
                finished_reason=done.finish_reason, num_prompt_tokens=done.num_prompt_tokens,
                num_generation_tokens=done.num_generation_tokens, e2e_latency_s=done.e2e_latency_s,
                queue_time_s=done.queue_time_s, prefill_time_s=done.prefill_time_s,
                decode_time_s=done.decode_time_s, max_tokens=done.max_tokens, n=done.n)

    async def drain(self, timeout: float) -> bool:
        """SIGTERM: refuse new requests (503, see `server.lifecycle`), let in-flight ones finish for up
        to `timeout` s, then end the rest with an error their clients see (an SSE error event and
        `[DONE]`, or a 503 body). True if everything finished in time."""
        self.draining = True
        engine = self.engine
        if engine is None:
            return True
        drained = await engine.drain(timeout)
        if not drained:
            logger.warning("drain timeout (%.0f s): requests still running were ended with an error", timeout)
        return drained

    async def shutdown(self) -> None:
        """Stop the engine; the requests still running (uvicorn's wait has expired) are aborted."""
        engine = self.engine
        if engine is None:
            return
        self.engine = None
        if not await engine.drain(_FINAL_DRAIN_S):
            logger.warning("aborted requests still running at shutdown")
        await asyncio.to_thread(engine.shutdown)
        logger.info("engine stopped")

    # --------------------------------------------------------------------------------- guards
    def require_engine(self) -> AsyncEngine:
        """The running engine, or a 503 saying why there is none."""
        engine = self.engine
        if engine is not None and engine.is_running:
            return engine
        if self.load_error is not None:
            raise service_unavailable(f"The model failed to load: {self.load_error}")
        if engine is None and self._loader is not None and self._loader.is_alive():
            raise service_unavailable("The model is still loading; retry shortly.", retry_after=5)
        raise service_unavailable("The engine is not running.")

    def require_tokenizer(self, purpose: str) -> Tokenizer:
        """The tokenizer, or a 400 explaining that this model only takes token ids."""
        if self.tokenizer is None:
            raise invalid_request(f"This model has no tokenizer, so {purpose} is not possible; "
                                  "send prompts as lists of token ids.")
        return self.tokenizer

    def check_model(self, requested: str | None) -> None:
        """404 unless `requested` is empty or our model's name (vLLM accepts an omitted model)."""
        if requested and requested != self.model_name:
            raise model_not_found(requested)

    @property
    def max_model_len(self) -> int:
        """The context limit clients are told: the configured cap, or the 64-bit position limit."""
        if self.info is not None:
            return self.info.max_model_len
        return self.settings.max_model_len or MAX_POSITION


def get_state(request: Request) -> ServerState:
    """The state of the app serving `request`."""
    return request.app.state.megalodon

