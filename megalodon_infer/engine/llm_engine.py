"""LLMEngine: requests in, outputs out, one `step()` at a time (schedule -> execute -> update).

Thread model: `add_request`, `abort_request`, `props`, `save_session` and `load_session` may be
called from any thread; each takes the engine lock for what it reads or writes of the scheduler, the
pool and the prefix cache. `step()` runs on one thread (the AsyncEngine's loop, or the caller of
`LLM.generate`): it holds the lock while it schedules and while it applies results, but not while
the model computes, so new requests are accepted during a forward. An abort is applied at the start
of the next step, which frees the slot. Knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megalodon_infer.config import EngineConfig
from megalodon_infer.core.prefix_cache import PrefixCache
from megalodon_infer.core.scheduler import AddResult, PrefillSegment, SchedRequest, Scheduler, SchedulerConfig, StepPlan
from megalodon_infer.core.sessions import Session, SessionError, load_session, model_fingerprint, save_session
from megalodon_infer.core.state_pool import SlotSnapshot, StatePool
from megalodon_infer.core.state_store import DirectoryStateStore
from megalodon_infer.engine.outputs import RequestOutput
from megalodon_infer.engine.request import Choice, Request
from megalodon_infer.engine.sampling_step import SamplingStep
from megalodon_infer.engine.shared_states import SharedStates
from megalodon_infer.engine.stats import FinishedRequestStats, IterationStats, PrefixCacheStats
from megalodon_infer.engine.structured import StructuredOutputs
from megalodon_infer.engine.validation import RequestLimits, compile_constraint, validate_request
from megalodon_infer.model.loading import load_model
from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.state import request_state_bytes
from megalodon_infer.sample.grammar import CompiledGrammar
from megalodon_infer.sample.params import SamplingParams, StructuredOutputsParams
from megalodon_infer.tokenization.tokenizer import Tokenizer
from megalodon_infer.worker.model_runner import ModelRunner
from megalodon_infer.worker.resources import apply_torch_threads, prefix_cache_budget

logger = logging.getLogger(__name__)

# Shared tokens beyond the longest cached state below which no junction snapshot is kept (a quarter
# of a chunk, for tiny chunk sizes).
JUNCTION_MIN_TOKENS = 16


@dataclass
class _StepResults:
    decode_logits: Tensor | None
    decode_error: str | None
    prefill_logits: dict[PrefillSegment, Tensor | str]  # logits, or the error that ended the request
    # states at chunk boundaries, taken right after their segment (later segments move the slot on)
    boundary_snapshots: dict[PrefillSegment, SlotSnapshot]
    # states inside a chunk: at the prompt's end, and where it left a cached path (a junction)
    partial_snapshots: dict[PrefillSegment, SlotSnapshot]


class LLMEngine:
    def __init__(self, model: Megalodon, tokenizer: Tokenizer | None, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        use_graphs = self.config.cuda_graphs and model.device.type == "cuda"
        self.pool = StatePool(model, self.config.max_num_seqs, self.config.state_memory_limit_bytes,
                              reserve_pad_slot=use_graphs)
        self.runner = ModelRunner(model, self.pool.state, self.pool.pad_slot, use_cuda_graphs=use_graphs,
                                  kernels=self.config.kernels)
        self.chunk_size = model.config.chunk_size
        self.scheduler = Scheduler(
            SchedulerConfig(chunk_size=self.chunk_size, max_num_batched_tokens=self.config.max_num_batched_tokens,
                            max_waiting_requests=self.config.max_waiting_requests),
            self.pool, on_admit=self._restore_cached_prefix)
        self.prefix_cache: PrefixCache | None = None
        budget = prefix_cache_budget(model.device, self.config.prefix_cache_bytes, self.config.prefix_cache_host_bytes)
        if budget.device_bytes > 0:
            self.prefix_cache = PrefixCache(self.chunk_size, budget.device_bytes, budget.host_bytes, model.device)
            logger.info("prefix cache: %s device bytes, %s host bytes (%s)", f"{budget.device_bytes:,}",
                        f"{budget.host_bytes:,}", budget.reason)
        else:
            logger.info("prefix cache: off")
        self.vocab_size = model.config.effective_output_size
        tokenizer_vocab = tokenizer.vocab_size if tokenizer is not None else self.vocab_size
        if tokenizer_vocab > self.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but the model only {self.vocab_size}")
        # a padded embedding table: ids past the tokenizer's vocabulary can never be emitted
        self.sampling = SamplingStep(num_untokenizable=self.vocab_size - tokenizer_vocab)
        # masks are computed between forwards, on the CPUs torch may use (the policy of `torch_threads`)
        self.structured = StructuredOutputs(tokenizer, self.vocab_size, num_threads=torch.get_num_threads())
        self.limits = RequestLimits(vocab_size=model.config.vocab_size, output_vocab_size=self.vocab_size,
                                    max_model_len=self.config.max_model_len, max_num_seqs=self.config.max_num_seqs,
                                    default_max_tokens=self.config.default_max_tokens)
        self.requests: dict[str, Request] = {}
        self._pending_aborts: dict[str, str | None] = {}  # request id -> the error to end it with (None: abort)
        self._lock = threading.RLock()
        self.last_stats = IterationStats()
        self._cache_counted = (0, 0, 0)  # prefix-cache (queried, hit) tokens and evictions already reported
        self._model_fingerprint: str | None = None
        self.state_store: DirectoryStateStore | None = None
        self.shared_states: SharedStates | None = None
        if self.config.state_store_dir is not None:
            if self.prefix_cache is None:
                raise ValueError("the state store (state_store_dir) needs the prefix cache: set prefix_cache_bytes")
            self.state_store = DirectoryStateStore(self.config.state_store_dir, self._fingerprint(), self.chunk_size,
                                                   self.config.state_store_bytes)
            self.shared_states = SharedStates(self.state_store, self.prefix_cache, self.pool, model.device, self._lock)
            logger.info("state store: %s (%s bytes)", self.state_store.root, f"{self.config.state_store_bytes:,}")
        logger.info("engine ready: %d state slots, %s bytes per slot, %s bytes in all", self.pool.num_slots,
                    f"{self.pool.bytes_per_slot:,}", f"{self.pool.total_bytes:,}")

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load `config.model` (weights and tokenizer) and build an engine over it."""
        apply_torch_threads(config.torch_threads)
        model = load_model(config.model, dtype=config.dtype, device=config.device)
        return cls(model, Tokenizer.from_dir(config.model), config)

    # ----------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, cache_salt: str | None = None) -> AddResult:
        """Queue a request. Raises ValueError (ContextLengthError) for a request that cannot run.

        `arrival_time` (time.monotonic) is when the request reached its caller (the server), so
        time-to-first-token counts tokenization too; default: now. `cache_salt` (vLLM's) names the
        prefix-cache namespace the request reads and writes: requests with different salts never
        share cached states.
        """
        prompt_ids = [int(t) for t in prompt_ids]
        max_tokens = validate_request(prompt_ids, params, self.limits)
        grammar = compile_constraint(params, self.structured)
        now = time.monotonic()
        request = Request(request_id, prompt_ids, params, max_tokens, tokenizer=self.tokenizer,
                          vocab_size=self.vocab_size, device=self.model.device,
                          arrival_time=now if arrival_time is None else arrival_time, queued_time=now,
                          cache_namespace=cache_salt or "", grammar=grammar)
        with self._lock:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            result = self.scheduler.add(request)
            if result is AddResult.ADDED:
                self.requests[request_id] = request
                if self.shared_states is not None:
                    self.shared_states.added(request)
        return result

    def compile_grammar(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Compile (and cache) a constraint now, e.g. off the event loop before `add_request`, which
        then finds it compiled. Raises ValueError for an invalid one. Needs no engine lock."""
        return self.structured.compile(spec)

    def cached_length(self, token_ids: list[int], cache_salt: str | None = None) -> int:
        """How many leading tokens of `token_ids` the prefix cache holds a state for (0 without a
        cache); a peek that counts no query."""
        if self.prefix_cache is None:
            return 0
        with self._lock:
            return self.prefix_cache.stored_length(list(token_ids), cache_salt or "")

    def abort_request(self, request_id: str, error: str | None = None) -> None:
        """Abort wherever the request is; its slot is free after the next step begins. With `error`,
        the request ends with that error (e.g. the server shutting down) instead of "abort"."""
        with self._lock:
            if request_id in self.requests:
                self._pending_aborts.setdefault(request_id, error)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self.requests)

    # ------------------------------------------------------------------------ introspection
    def props(self) -> dict[str, Any]:
        """What a request's state costs and how the engine is set up (the server's /props)."""
        cfg, model = self.model.config, self.model
        with self._lock:
            cache = self.prefix_cache
            return {
                "chunk_size": cfg.chunk_size,
                "num_layers": cfg.num_layers,
                "dtype": str(model.dtype).removeprefix("torch."),
                "device": str(model.device),
                "decode_kernels": self.runner.decode_backend,
                "max_model_len": self.config.max_model_len,
                "max_num_seqs": self.config.max_num_seqs,
                "max_num_batched_tokens": self.config.max_num_batched_tokens,
                "num_state_slots": self.pool.num_slots,
                "bytes_per_slot": self.pool.bytes_per_slot,
                "state_pool_bytes": self.pool.total_bytes,
                "bytes_per_snapshot_at_chunk_boundary": request_state_bytes(cfg, model.dtype, model.stat_dtype,
                                                                            num_kv=0),
                "bytes_per_request_worst_case": request_state_bytes(cfg, model.dtype, model.stat_dtype),
                "prefix_cache": {
                    "enabled": cache is not None,
                    "device_bytes": cache.device_bytes if cache is not None else 0,
                    "host_bytes": cache.host_bytes if cache is not None else 0,
                    "stored_bytes": cache.stored_bytes() if cache is not None else 0,
                    "entries": len(cache) if cache is not None else 0,
                },
            }

    # ------------------------------------------------------------------------------ sessions
    def save_session(self, name: str, token_ids: list[int], directory: str | Path,
                     cache_salt: str | None = None) -> int:
        """Write the longest cached state that `token_ids` begins with under `name`.

        After a chat turn the cache holds the state after prompt + reply (minus the reply's last
        token, which was sampled but never consumed), so passing the conversation so far saves it.
        Returns how many tokens the saved state covers.
        """
        if self.prefix_cache is None:
            raise SessionError("sessions need the prefix cache: set prefix_cache_bytes")
        with self._lock:
            hit = self.prefix_cache.lookup(list(token_ids), namespace=cache_salt or "")
            if hit is None:
                raise SessionError("no cached state for this conversation (it was never run or was evicted)")
            session = Session(name, list(token_ids[:hit.num_tokens]), hit.entry.snapshot, hit.entry.last_logits)
        save_session(Path(directory), session, self._fingerprint())
        return hit.num_tokens

    def load_session(self, name: str, directory: str | Path, max_bytes: int = 1 << 30,
                     cache_salt: str | None = None) -> int:
        """Put a saved session back into the prefix cache (under `cache_salt`'s namespace); returns the
        number of tokens it covers."""
        if self.prefix_cache is None:
            raise SessionError("sessions need the prefix cache: set prefix_cache_bytes")
        session = load_session(Path(directory), name, self._fingerprint(), max_bytes)
        mismatch = self.pool.snapshot_mismatch(session.snapshot)
        if mismatch is not None:
            raise SessionError(f"session {name!r} does not fit this model ({mismatch})")
        snapshot = session.snapshot.to(self.model.device)
        with self._lock:
            self.prefix_cache.insert_final(session.token_ids, snapshot, session.last_logits,
                                           namespace=cache_salt or "")
        return len(session.token_ids)

    def _fingerprint(self) -> str:
        if self._model_fingerprint is None:  # hashing every weight once, on first use
            self._model_fingerprint = model_fingerprint(self.model)
        return self._model_fingerprint

    # ---------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        stats = IterationStats()
        while True:
            with self._lock:
                unchecked = self.shared_states.take_unchecked() if self.shared_states is not None else []
                if not unchecked:
                    # NOTE: scheduled in the same critical section that found every waiting request
                    # looked up, so none is admitted before the store had its chance.
                    outputs = self._apply_aborts(stats)
                    plan = self.scheduler.schedule()
                    self._on_admitted(plan)
                    break
            self.shared_states.fetch(unchecked, lambda request_id: request_id in self.requests)
        if not plan.is_empty:
            results = self._execute(plan)
            with self._lock:
                outputs.extend(self._update(plan, results, stats))
                stats.num_prompt_tokens = sum(s.num_tokens for s in plan.prefills)
        with self._lock:
            self._fill_gauges(stats)
        self.last_stats = stats
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an unexpected failure of a whole step)."""
        with self._lock:
            now = time.monotonic()
            stats = IterationStats()
            outputs = []
            for request_id, request in list(self.requests.items()):
                request.fail(message)
                self.scheduler.abort(request_id)
                self._release(request)
                outputs.append(request.make_output(now))
                stats.finished_requests.append(FinishedRequestStats.of(request, now))
            self.requests.clear()
            self._pending_aborts.clear()
            self._fill_gauges(stats)
            self.last_stats = stats
            return outputs

    def close(self, timeout: float = 30.0) -> None:
        """Finish the state store's queued writes (up to `timeout` s); the engine takes no more steps."""
        if self.state_store is not None:
            self.state_store.close(timeout)

    def _fill_gauges(self, stats: IterationStats) -> None:
        stats.num_running = self.scheduler.num_running_seqs
        stats.num_waiting = self.scheduler.num_waiting
        stats.slot_usage = self.pool.usage
        cache = self.prefix_cache
        if cache is not None:
            counted = (cache.stats.queried_tokens, cache.stats.hit_tokens, cache.stats.evictions)
            stats.prefix_cache = PrefixCacheStats(
                queried_tokens=counted[0] - self._cache_counted[0], hit_tokens=counted[1] - self._cache_counted[1],
                evictions=counted[2] - self._cache_counted[2], stored_bytes=cache.stored_bytes(),
                num_entries=len(cache))
            self._cache_counted = counted

    def _apply_aborts(self, stats: IterationStats) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for request_id, error in self._pending_aborts.items():
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            self.scheduler.abort(request_id)
            self._release(request)
            if error is None:
                request.finish_all("abort")
            else:
                request.fail(error)
            outputs.append(request.make_output(now))
            stats.finished_requests.append(FinishedRequestStats.of(request, now))
        self._pending_aborts.clear()
        return outputs

    def _restore_cached_prefix(self, sched_req: SchedRequest) -> int:
        """Scheduler hook at admission: restore the longest cached prefix into the prefill slot."""
        request: Request = sched_req  # type: ignore[assignment]  # the scheduler holds our requests
        cache = self.prefix_cache
        if cache is None or request.prompt_logprobs is not None:
            return 0  # prompt logprobs need the logits of every prompt position
        match = cache.match_length(request.prompt_ids, request.cache_namespace)
        hit = cache.lookup(request.prompt_ids, namespace=request.cache_namespace)
        # NOTE: the prompt agrees with a stored path beyond any stored state: stop a prefill segment
        # where it leaves that path and keep the state there (a junction), so the next request sharing
        # this prefix (a system prompt or document ending inside a chunk) resumes from it. A few shared
        # tokens (a BOS, a common first word) are cheaper to recompute than to store.
        gain = match - (hit.num_tokens if hit is not None else 0)
        min_gain = min(JUNCTION_MIN_TOKENS, self.chunk_size // 4)
        if gain >= min_gain and match % self.chunk_size and match < len(request.prompt_ids):
            request.cut_at = match
        if hit is None:
            return 0
        self.pool.restore(cache.restore_snapshot(hit), request.slot_ids[0])
        cache.pin(hit.entry)  # the boundary chain this request continues stays while it runs
        request.pinned_entries.append(hit.entry)
        request.num_cached_tokens = hit.num_tokens
        first = request.choices[0]
        first.cache_parent = cache.boundary_of(hit.entry)
        first.cache_depth = 0 if first.cache_parent is None else first.cache_parent.num_tokens
        if hit.num_tokens == len(request.prompt_ids):
            request.cached_first_logits = hit.entry.last_logits.to(self.model.device)
        return hit.num_tokens

    def _on_admitted(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for request_id in plan.admitted:
            request = self.requests[request_id]
            request.metrics.first_scheduled_time = now
            for choice, slot in zip(request.choices, request.slot_ids, strict=True):
                choice.slot_id = slot

    def _execute(self, plan: StepPlan) -> _StepResults:
        """Run the model; a failure ends only the requests it touched (reported in the results)."""
        results = _StepResults(decode_logits=None, decode_error=None, prefill_logits={}, boundary_snapshots={},
                               partial_snapshots={})
        if plan.decodes:
            slots = [d.slot_id for d in plan.decodes]
            tokens = [self.requests[d.request_id].choice_for_slot(d.slot_id).last_token for d in plan.decodes]
            try:
                results.decode_logits = self.runner.decode(slots, tokens)
            except Exception as exc:  # noqa: BLE001 - reported to the affected requests, engine lives on
                logger.exception("decode step failed")
                results.decode_error = f"decode failed: {exc}"
        for seg in plan.prefills:
            request = self.requests[seg.request_id]
            try:
                results.prefill_logits[seg] = self.runner.prefill(
                    seg.slot_id, request.prompt_ids[seg.start:seg.end],
                    all_logits=request.prompt_logprobs is not None)
                if self.prefix_cache is not None:
                    self._snapshot_segment(request, seg, results)
            except Exception as exc:  # noqa: BLE001
                logger.exception("prefill of %s failed", seg.request_id)
                results.prefill_logits[seg] = f"prefill failed: {exc}"
        return results

    def _snapshot_segment(self, request: Request, seg: PrefillSegment, results: _StepResults) -> None:
        """Right after a prefill segment: keep the state where the cache will want it."""
        if seg.end % self.chunk_size == 0:
            results.boundary_snapshots[seg] = self.pool.snapshot(seg.slot_id, position=seg.end)
        elif seg.end in (request.cut_at, len(request.prompt_ids)):
            results.partial_snapshots[seg] = self.pool.snapshot(seg.slot_id, position=seg.end)

    def _update(self, plan: StepPlan, results: _StepResults, stats: IterationStats) -> list[RequestOutput]:
        """Apply a step's results; returns the outputs."""
        touched: dict[str, Request] = {}
        self.sampling.begin()
        for request_id in plan.admitted:
            request = self.requests.get(request_id)
            if request is not None and request.cached_first_logits is not None:
                touched[request_id] = request  # the whole prompt came from the cache: sample at once
                self.scheduler.on_prefilled(request_id, 0)
                self._start_decoding(request, request.cached_first_logits)
        for seg, logits in results.prefill_logits.items():
            request = self.requests.get(seg.request_id)
            if request is None or seg.request_id in self._pending_aborts:
                continue
            touched[seg.request_id] = request
            if isinstance(logits, str):
                self._fail(request, logits)
                continue
            if request.prompt_logprobs is not None:
                request.prompt_logprobs.add_segment(seg.start, logits)
            if seg in results.boundary_snapshots:
                self._store_boundary(request, request.choices[0], request.prompt_ids[seg.end - self.chunk_size:seg.end],
                                     results.boundary_snapshots[seg], last_logits=logits[-1])
            elif seg in results.partial_snapshots:
                # the prompt's end (a whole-prompt hit next time) or a junction: the partial chunk's KV included
                self.prefix_cache.insert_final(request.prompt_ids[:seg.end], results.partial_snapshots[seg], logits[-1],
                                               namespace=request.cache_namespace)
            if self.scheduler.on_prefilled(seg.request_id, seg.num_tokens):
                self._start_decoding(request, logits[-1])
        for row, item in enumerate(plan.decodes):
            request = self.requests.get(item.request_id)
            if request is None or item.request_id in self._pending_aborts:
                continue
            touched[item.request_id] = request
            if results.decode_error is not None:
                self._fail(request, results.decode_error)
                continue
            choice = request.choice_for_slot(item.slot_id)
            fed = choice.num_fed_tokens
            if self.prefix_cache is not None and fed % self.chunk_size == 0:
                snapshot = self.pool.snapshot(item.slot_id, position=fed)
                self._store_boundary(request, choice, choice.last_block(self.chunk_size), snapshot)
            self.sampling.add(request, choice, results.decode_logits[row])
        for request, message in self.sampling.run(stats):
            self._fail(request, message)
        for request, choice, logits in self.sampling.finished:
            if self.prefix_cache is not None:
                # the complete state after every token it consumed, and the logits it ended on
                fed = request.prompt_ids + choice.output_ids[:-1]
                snapshot = self.pool.snapshot(choice.slot_id, position=len(fed))
                self.prefix_cache.insert_final(fed, snapshot, logits, namespace=request.cache_namespace)
                if self.state_store is not None:  # queued: written by the store's thread
                    self.state_store.put(request.cache_namespace, fed, snapshot, logits)
            if request.request_id in self.scheduler.running:
                self.scheduler.finish_sequence(request.request_id, choice.slot_id)
        return self._collect_outputs(touched, stats)

    def _start_decoding(self, request: Request, last_logits: Tensor) -> None:
        request.prompt_complete = True
        slots = request.slot_ids
        if request.max_tokens == 0:  # scoring only (echo with max_tokens=0)
            request.finish_all("length")
            self.scheduler.finish_request(request.request_id)
            return
        first = request.choices[0]
        for choice in request.choices[1:]:
            # n > 1: one prefill, n independent continuations from copies of its state
            self.pool.copy_slot(slots[0], choice.slot_id, position=len(request.prompt_ids))
            choice.cache_parent, choice.cache_depth = first.cache_parent, first.cache_depth
        for choice in request.choices:
            self.sampling.add(request, choice, last_logits)

    def _store_boundary(self, request: Request, choice: Choice, block: list[int], snapshot: SlotSnapshot,
                        last_logits: Tensor | None = None) -> None:
        """At a chunk boundary the state is tiny (no KV): keep it for requests sharing this prefix.

        The entry goes under the boundary the choice continued from; if that chain is not cached
        (evicted, never stored), nothing below it is stored either.
        """
        position = snapshot.position
        if choice.cache_depth != position - self.chunk_size:
            choice.cache_depth = -1
            return
        entry = self.prefix_cache.insert_boundary(choice.cache_parent, block, snapshot, pin=True,
                                                  last_logits=last_logits, namespace=request.cache_namespace)
        if entry is None:
            choice.cache_parent, choice.cache_depth = None, -1
            return
        request.pinned_entries.append(entry)
        choice.cache_parent, choice.cache_depth = entry, position

    def _release(self, request: Request) -> None:
        """A request ended: the cache entries it pinned may be evicted again."""
        if self.prefix_cache is not None:
            for entry in request.pinned_entries:
                self.prefix_cache.unpin(entry)
        request.pinned_entries.clear()

    def _fail(self, request: Request, message: str) -> None:
        request.fail(message)
        if request.request_id in self.scheduler.running:
            self.scheduler.finish_request(request.request_id)

    def _collect_outputs(self, touched: dict[str, Request], stats: IterationStats) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for request_id, request in touched.items():
            output = request.make_output(now)
            if output.outputs or output.finished or output.prompt_logprobs is not None:
                outputs.append(output)
            if request.finished:
                self._release(request)
                self.requests.pop(request_id, None)
                if request_id in self.scheduler.running:
                    self.scheduler.finish_request(request_id)
                stats.finished_requests.append(FinishedRequestStats.of(request, now))
        return outputs
