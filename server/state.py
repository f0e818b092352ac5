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

from megalodon_infer.async_engine import AsyncEngine
from megalodon_infer.engine import EngineStats, LLMEngine
from megalodon_infer.outputs import RequestOutput
from megalodon_infer.tokenizer import Tokenizer
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
    config = settings.engine_config()
    return LLMEngine.from_pretrained(settings.model, dtype=settings.dtype, device=settings.device,
                                     **config.model_dump())


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
        self._llm: LLMEngine | None = None
        self._cache_counted = (0, 0, 0)  # prefix-cache (queried, hit) tokens and evictions already counted

    # ------------------------------------------------------------------------------ lifecycle
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="megalodon-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            llm = self._engine_factory(self.settings)
            self._llm = llm
            self.info = ModelInfo(max_model_len=llm.config.max_model_len, num_slots=llm.pool.num_slots)
            self._set_info_metrics(llm)
            engine = AsyncEngine(llm, step_observer=self._on_step)
            engine.start()
        except Exception as exc:  # noqa: BLE001 - reported on /health and ends the process
            logger.exception("loading the model from %s failed", self.settings.model)
            self.load_error = f"{type(exc).__name__}: {exc}"
            if self._on_fatal is not None:
                self._on_fatal()
            return
        self.tokenizer = llm.tokenizer
        self.engine = engine  # published last: from here on requests are accepted
        logger.info("model %s loaded from %s (%d state slots, max_model_len %d)%s", self.model_name,
                    self.settings.model, self.info.num_slots, self.info.max_model_len,
                    "" if self.tokenizer else "; no tokenizer: token-id prompts only")

    def _set_info_metrics(self, llm: LLMEngine) -> None:
        config = llm.model.config
        self.metrics.set_cache_config_info(
            num_state_slots=llm.pool.num_slots, bytes_per_slot=llm.pool.bytes_per_slot,
            chunk_size=config.chunk_size, enable_prefix_caching=llm.prefix_cache is not None,
            prefix_cache_bytes=llm.config.prefix_cache_bytes,
            prefix_cache_host_bytes=llm.config.prefix_cache_host_bytes)
        self.metrics.set_model_config_info(
            served_model_name=self.model_name, max_model_len=llm.config.max_model_len,
            dtype=self.settings.dtype, device=self.settings.device, num_layers=config.num_layers,
            model_dim=config.model_dim, vocab_size=config.vocab_size,
            max_num_seqs=llm.config.max_num_seqs, max_num_batched_tokens=llm.config.max_num_batched_tokens)

    def _on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        """Engine thread, after every step."""
        cache = self._llm.prefix_cache if self._llm is not None else None
        num_checkpoints = None
        if cache is not None:
            # The cache counts in tokens since it was created; the counters move by the difference.
            queried, hits, evictions = cache.stats.queried_tokens, cache.stats.hit_tokens, cache.stats.evictions
            self.metrics.on_prefix_cache_lookup(num_queried_tokens=queried - self._cache_counted[0],
                                                num_hit_tokens=hits - self._cache_counted[1])
            self.metrics.set_prefix_cache_usage(stored_bytes=cache.stored_bytes(),
                                                new_evictions=evictions - self._cache_counted[2])
            self._cache_counted = (queried, hits, evictions)
            num_checkpoints = len(cache)
        self.metrics.set_scheduler_stats(stats.num_running, stats.num_waiting, stats.slot_usage,
                                         num_checkpoints=num_checkpoints)
        self.metrics.on_step(num_prompt_tokens=stats.num_prompt_tokens,
                             num_generation_tokens=stats.num_generation_tokens)

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

    def require_llm_engine(self) -> LLMEngine:
        """The engine core (for state introspection and sessions), or a 503 while none runs."""
        self.require_engine()
        return self._llm

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len if self.info is not None else self.settings.max_model_len


def get_state(request: Request) -> ServerState:
    """The state of the app serving `request`."""
    return request.app.state.megalodon

