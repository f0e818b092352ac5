"""Prometheus metrics: vLLM's meanings and bucket layouts under a `megalodon:` prefix.

Owns the metric definitions and their registry. Mirroring vLLM (v1 loggers) lets vLLM Grafana
dashboards and autoscalers work with a `vllm:` -> `megalodon:` relabel; the recurrent-state
analogues (state slots instead of KV blocks, checkpoints) keep vLLM's semantics where one exists.
Knows nothing of the engine's types: callers pass plain numbers, from any thread.

Time definitions (seconds):
- TTFT: request arrival at the server (tokenization included, as in vLLM) to the first output token.
- queue: arrival in the waiting queue to first scheduled; prefill: first scheduled to first token;
  decode: first token to last token; inference = prefill + decode; e2e: arrival to finish.
"""

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "megalodon:"
# The gauges that routers built for vLLM (llm-d's scorers, production-stack, KServe) read to pick a
# replica, also exported under vLLM's own names: `kv_cache_usage_perc` is the state-slot usage.
VLLM_PREFIX = "vllm:"
LABEL_NAMES = ("model_name", "engine")
FINISHED_REASONS = ("stop", "length", "abort", "error")

# vLLM's bucket layouts, kept identical so dashboards and SLO queries port unchanged.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
# The largest token-count bucket when the context has no cap (vLLM sizes them by max_model_len).
MAX_TOKENS_BUCKET = 10_000_000


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including `max_value` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return buckets
            buckets.append(value)
        scale *= 10


class Metrics:
    """All server and engine metrics of one model, in a registry of their own (so tests and
    several apps in one process never collide).

    Counting rules: token counters move per engine step (`on_step`), as in vLLM, so they are
    current while long requests run; per-request histograms move once, in `on_request_finished`.
    """

    def __init__(self, model_name: str, *, max_model_len: int, engine: str = "0") -> None:
        """`max_model_len`: the largest token count the per-request token histograms resolve (the
        context cap, as in vLLM; the server passes MAX_TOKENS_BUCKET when there is none)."""
        self.registry = CollectorRegistry()
        # vLLM (single API process) also exposes process_* and python_* metrics.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._labels = (model_name, engine)
        self._info_gauges: dict[str, Gauge] = {}
        token_buckets = build_1_2_5_buckets(max_model_len)

        self._running = self._gauge("num_requests_running", "Number of requests in the running batch.")
        self._waiting = self._gauge("num_requests_waiting", "Number of requests waiting to be scheduled.")
        self._slot_usage = self._gauge(
            "state_slot_usage_perc", "Fraction of recurrent-state slots in use (1 = full)."
        )
        self._vllm_running, self._vllm_waiting, self._vllm_cache_usage = (
            Gauge(VLLM_PREFIX + name, doc, labelnames=LABEL_NAMES, registry=self.registry).labels(*self._labels)
            for name, doc in (("num_requests_running", "Number of requests in the running batch (vLLM's name)."),
                              ("num_requests_waiting", "Number of requests waiting to be scheduled (vLLM's name)."),
                              ("kv_cache_usage_perc", "Fraction of recurrent-state slots in use, 1 = full (vLLM's "
                               "name for its KV-cache usage, which the slots stand in for).")))
        self._checkpoints = self._gauge(
            "num_state_checkpoints", "Chunk-boundary state checkpoints held by the prefix cache."
        )

        self._prompt_tokens = self._counter("prompt_tokens", "Prefill tokens processed.")
        self._generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        self._cache_queries = self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self._cache_hits = self._counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.")
        self._cache_evictions = self._counter(
            "prefix_cache_evictions", "State snapshots moved out of a prefix-cache tier (device to host, or dropped)."
        )
        self._cache_bytes = self._gauge("prefix_cache_stored_bytes", "Bytes of state snapshots in the prefix cache.")
        self._disconnects = self._counter(
            "http_requests_client_disconnected", "Requests whose client left before the response finished."
        )
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            labelnames=(*LABEL_NAMES, "finished_reason"),
            registry=self.registry,
        )
        # Pre-create the usual reasons so rate() queries see 0 rather than an absent series.
        for reason in FINISHED_REASONS:
            self._success.labels(*self._labels, reason)

        self._iteration_tokens = self._histogram(
            "iteration_tokens_total", "Tokens processed per engine step.", ITERATION_TOKENS_BUCKETS
        )
        self._ttft = self._histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self._itl = self._histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", INTER_TOKEN_LATENCY_BUCKETS
        )
        self._tpot = self._histogram(
            "request_time_per_output_token_seconds",
            "Mean time per output token of each request (decode time / (output tokens - 1)).",
            INTER_TOKEN_LATENCY_BUCKETS,
        )
        self._e2e = self._histogram("e2e_request_latency_seconds", "End-to-end request latency.")
        self._queue = self._histogram("request_queue_time_seconds", "Time spent waiting to be scheduled.")
        self._inference = self._histogram("request_inference_time_seconds", "Time spent running (prefill + decode).")
        self._prefill = self._histogram("request_prefill_time_seconds", "From first scheduled to first token.")
        self._decode = self._histogram("request_decode_time_seconds", "From first token to last token.")
        self._req_prompt = self._histogram("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self._req_generation = self._histogram(
            "request_generation_tokens", "Generated tokens per request.", token_buckets
        )
        self._params_n = self._histogram("request_params_n", "The n request parameter.", REQUEST_PARAMS_N_BUCKETS)
        self._params_max_tokens = self._histogram(
            "request_params_max_tokens", "The max_tokens request parameter.", token_buckets
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, labelnames=LABEL_NAMES, registry=self.registry).labels(*self._labels)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(PREFIX + name, doc, labelnames=LABEL_NAMES, registry=self.registry).labels(*self._labels)

    def _histogram(
        self, name: str, doc: str, buckets: Iterable[float] = REQUEST_LATENCY_BUCKETS
    ) -> Histogram:
        metric = Histogram(
            PREFIX + name, doc, labelnames=LABEL_NAMES, buckets=tuple(buckets), registry=self.registry
        )
        return metric.labels(*self._labels)

    def set_scheduler_stats(
        self, num_running: int, num_waiting: int, slot_usage: float, *, num_checkpoints: int | None = None
    ) -> None:
        """Queue and capacity gauges, after each scheduling step. `slot_usage` is a fraction in [0, 1]."""
        for gauge, value in ((self._running, num_running), (self._waiting, num_waiting),
                             (self._slot_usage, slot_usage), (self._vllm_running, num_running),
                             (self._vllm_waiting, num_waiting), (self._vllm_cache_usage, slot_usage)):
            gauge.set(value)
        if num_checkpoints is not None:
            self._checkpoints.set(num_checkpoints)

    def on_step(self, *, num_prompt_tokens: int, num_generation_tokens: int) -> None:
        """Tokens processed by one engine step (prefill segments and decoded tokens)."""
        self._prompt_tokens.inc(num_prompt_tokens)
        self._generation_tokens.inc(num_generation_tokens)
        self._iteration_tokens.observe(num_prompt_tokens + num_generation_tokens)

    def on_prefix_cache_lookup(self, *, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """One prefix-cache lookup, in tokens; hit rate = rate(hits) / rate(queries)."""
        self._cache_queries.inc(num_queried_tokens)
        self._cache_hits.inc(num_hit_tokens)

    def set_prefix_cache_usage(self, *, stored_bytes: int, new_evictions: int) -> None:
        """Bytes the prefix cache holds now, and evictions since the last call."""
        self._cache_bytes.set(stored_bytes)
        self._cache_evictions.inc(new_evictions)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def on_client_disconnect(self) -> None:
        """A client left before its response finished (its request is then finished as "abort")."""
        self._disconnects.inc()

    def on_request_finished(
        self,
        *,
        finished_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        e2e_latency_s: float,
        queue_time_s: float,
        prefill_time_s: float,
        decode_time_s: float,
        max_tokens: int | None = None,
        n: int = 1,
    ) -> None:
        """Record one finished request (`finished_reason`: "stop", "length", "abort", ...)."""
        self._success.labels(*self._labels, finished_reason).inc()
        self._req_prompt.observe(num_prompt_tokens)
        self._req_generation.observe(num_generation_tokens)
        self._e2e.observe(e2e_latency_s)
        self._queue.observe(queue_time_s)
        self._prefill.observe(prefill_time_s)
        self._decode.observe(decode_time_s)
        self._inference.observe(prefill_time_s + decode_time_s)
        self._params_n.observe(n)
        if max_tokens is not None:
            self._params_max_tokens.observe(max_tokens)
        if num_generation_tokens > 1:
            self._tpot.observe(decode_time_s / (num_generation_tokens - 1))

    def set_cache_config_info(self, **labels: object) -> None:
        """`megalodon:cache_config_info` = 1 with the cache config as labels (like vLLM's)."""
        self._set_info("cache_config_info", "Information of the state cache configuration.", labels)

    def set_model_config_info(self, **labels: object) -> None:
        """`megalodon:model_config_info` = 1 with the model config as labels."""
        self._set_info("model_config_info", "Information of the model configuration.", labels)

    def _set_info(self, name: str, doc: str, labels: dict[str, object]) -> None:
        # Label names are fixed per metric, so a new set of labels means a new metric.
        if name in self._info_gauges:
            self.registry.unregister(self._info_gauges.pop(name))
        names = sorted(labels)
        gauge = Gauge(PREFIX + name, doc, labelnames=names, registry=self.registry)
        gauge.labels(*(str(labels[key]) for key in names)).set(1)
        self._info_gauges[name] = gauge

    @property
    def content_type(self) -> str:
        """The Content-Type of `render()`'s output."""
        return CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)
