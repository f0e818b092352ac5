"""LLMEngine: requests in, outputs out, one `step()` at a time (schedule -> execute -> update).

Thread model: `add_request` and `abort_request` may be called from any thread. `step()` runs on one
thread (the AsyncEngine's loop, or the caller of `LLM.generate`): it holds the engine lock while it
schedules and while it applies results, but not while the model computes, so new requests are
accepted during a forward. An abort is applied at the start of the next step, which frees the slot.
Knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .engine_config import EngineConfig
from .errors import ContextLengthError
from .loading import load_model
from .model.megalodon import Megalodon
from .model_runner import ModelRunner
from .outputs import RequestOutput, TokenLogprob
from .prefix_cache import PrefixCache
from .sampling import SampleOutput, sample, token_logprobs
from .sampling_params import SamplingParams
from .scheduler import AddResult, PrefillSegment, SchedRequest, Scheduler, SchedulerConfig, StepPlan
from .sequence import Choice, Request
from .sessions import Session, SessionError, load_session, model_fingerprint, save_session
from .state_pool import SlotSnapshot, StatePool
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    slot_usage: float
    num_prompt_tokens: int  # prompt tokens computed by the last step
    num_generation_tokens: int  # tokens sampled by the last step


@dataclass
class _StepResults:
    decode_logits: Tensor | None
    decode_error: str | None
    prefill_logits: dict[PrefillSegment, Tensor | str]  # logits, or the error that ended the request
    # states at chunk boundaries, taken right after their segment (later segments move the slot on)
    boundary_snapshots: dict[PrefillSegment, SlotSnapshot]


class LLMEngine:
    def __init__(self, model: Megalodon, tokenizer: Tokenizer | None, config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        use_graphs = self.config.cuda_graphs and model.device.type == "cuda"
        self.pool = StatePool(model, self.config.max_num_seqs, self.config.state_memory_limit_bytes,
                              reserve_pad_slot=use_graphs)
        self.runner = ModelRunner(model, self.pool, use_cuda_graphs=use_graphs)
        self.scheduler = Scheduler(
            SchedulerConfig(chunk_size=model.config.chunk_size,
                            max_num_batched_tokens=self.config.max_num_batched_tokens,
                            max_waiting_requests=self.config.max_waiting_requests),
            self.pool, on_admit=self._restore_cached_prefix)
        self.prefix_cache: PrefixCache | None = None
        if self.config.prefix_cache_bytes > 0:
            self.prefix_cache = PrefixCache(model.config.chunk_size, self.config.prefix_cache_bytes,
                                            self.config.prefix_cache_host_bytes, model.device)
        self.vocab_size = model.config.effective_output_size
        tokenizer_vocab = tokenizer.vocab_size if tokenizer is not None else self.vocab_size
        if tokenizer_vocab > self.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens but the model only {self.vocab_size}")
        self._num_untokenizable = self.vocab_size - tokenizer_vocab
        self.requests: dict[str, Request] = {}
        self._pending_aborts: set[str] = set()
        self._lock = threading.RLock()
        self.last_stats = EngineStats(0, 0, 0.0, 0, 0)
        self._model_fingerprint: str | None = None
        logger.info("engine ready: %d state slots, %s bytes per slot, %s bytes in all", self.pool.num_slots,
                    f"{self.pool.bytes_per_slot:,}", f"{self.pool.total_bytes:,}")

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        **engine_options) -> LLMEngine:
        model = load_model(path, dtype=dtype, device=device)
        return cls(model, Tokenizer.from_dir(path), EngineConfig(**engine_options))

    # ----------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> AddResult:
        """Queue a request. Raises ValueError (ContextLengthError) for a request that cannot run."""
        prompt_ids = [int(t) for t in prompt_ids]
        self._validate(prompt_ids, params)
        request = Request(request_id, prompt_ids, params, self.tokenizer, self.vocab_size,
                          self.config.max_model_len, arrival_time)
        with self._lock:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            result = self.scheduler.add(SchedRequest(request_id, len(prompt_ids), num_seqs=params.n))
            if result is AddResult.ADDED:
                self.requests[request_id] = request
        return result

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.model.config.vocab_size}), got {bad[:5]}")
        max_len = self.config.max_model_len
        # a prompt may fill the context only when nothing is generated (echo scoring)
        room = max_len - len(prompt_ids)
        if room < 0 or (params.max_tokens is None and room == 0) or (
                params.max_tokens is not None and params.max_tokens > room):
            raise ContextLengthError(len(prompt_ids), params.max_tokens, max_len)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) must not exceed max_num_seqs ({self.config.max_num_seqs})")
        bad_bias = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {bad_bias[:5]}")

    def abort_request(self, request_id: str) -> None:
        """Abort wherever the request is; its slot is free after the next step begins."""
        with self._lock:
            if request_id in self.requests:
                self._pending_aborts.add(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self.requests)

    # ------------------------------------------------------------------------------ sessions
    def save_session(self, name: str, token_ids: list[int], directory: str | Path) -> int:
        """Write the longest cached state that `token_ids` begins with under `name`.

        After a chat turn the cache holds the state after prompt + reply (minus the reply's last
        token, which was sampled but never consumed), so passing the conversation so far saves it.
        Returns how many tokens the saved state covers.
        """
        if self.prefix_cache is None:
            raise SessionError("sessions need the prefix cache: set prefix_cache_bytes")
        with self._lock:
            hit = self.prefix_cache.lookup(list(token_ids))
            if hit is None:
                raise SessionError("no cached state for this conversation (it was never run or was evicted)")
            entry = hit.entry
            session = Session(name, list(token_ids[:hit.num_tokens]), entry.snapshot, entry.last_logits)
        save_session(Path(directory), session, self._fingerprint())
        return hit.num_tokens

    def load_session(self, name: str, directory: str | Path, max_bytes: int = 1 << 30) -> int:
        """Put a saved session back into the prefix cache; returns the number of tokens it covers."""
        if self.prefix_cache is None:
            raise SessionError("sessions need the prefix cache: set prefix_cache_bytes")
        session = load_session(Path(directory), name, self._fingerprint(), max_bytes)
        reference = self.pool.snapshot(0)
        for key, tensor in session.snapshot.tensors().items():
            want = reference.tensors()[key]
            shape_ok = tensor.shape[:1] + tensor.shape[2:] == want.shape[:1] + want.shape[2:] \
                if key in ("keys", "values") else tensor.shape == want.shape
            if not shape_ok or tensor.dtype != want.dtype:
                raise SessionError(f"session {name!r} does not fit this model ({key} {tuple(tensor.shape)})")
        snapshot = session.snapshot.to(self.model.device)
        with self._lock:
            self.prefix_cache.insert_final(session.token_ids, snapshot, session.last_logits)
        return len(session.token_ids)

    def _fingerprint(self) -> str:
        if self._model_fingerprint is None:  # hashing every weight once, on first use
            self._model_fingerprint = model_fingerprint(self.model)
        return self._model_fingerprint

    # ---------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs = self._apply_aborts()
            plan = self.scheduler.schedule()
            self._on_admitted(plan)
        if plan.is_empty:
            self.last_stats = EngineStats(self.scheduler.num_running_seqs, self.scheduler.num_waiting,
                                          self.pool.usage, 0, 0)
            return outputs
        results = self._execute(plan)
        with self._lock:
            step_outputs, num_generated = self._update(plan, results)
            outputs.extend(step_outputs)
            self.last_stats = EngineStats(self.scheduler.num_running_seqs, self.scheduler.num_waiting,
                                          self.pool.usage, sum(s.num_tokens for s in plan.prefills),
                                          num_generated)
        return outputs

    def stats(self) -> EngineStats:
        """Queue and slot gauges now, and the token counts of the last step (zero for an idle one)."""
        with self._lock:
            return EngineStats(self.scheduler.num_running_seqs, self.scheduler.num_waiting, self.pool.usage,
                               self.last_stats.num_prompt_tokens, self.last_stats.num_generation_tokens)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an unexpected failure of a whole step)."""
        with self._lock:
            now = time.monotonic()
            outputs = []
            for request_id, request in list(self.requests.items()):
                request.error = message
                request.finish_all("error")
                self.scheduler.abort(request_id)
                self._release(request)
                outputs.append(request.make_output(now))
            self.requests.clear()
            self._pending_aborts.clear()
            return outputs

    def _apply_aborts(self) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for request_id in self._pending_aborts:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            self.scheduler.abort(request_id)
            self._release(request)
            request.finish_all("abort")
            outputs.append(request.make_output(now))
        self._pending_aborts.clear()
        return outputs

    def _restore_cached_prefix(self, sched_req: SchedRequest) -> int:
        """Scheduler hook at admission: restore the longest cached prefix into the prefill slot."""
        request = self.requests[sched_req.request_id]
        if self.prefix_cache is None or request.prompt_logprobs is not None:
            return 0  # prompt logprobs need the logits of every prompt position
        hit = self.prefix_cache.lookup(request.prompt_ids)
        if hit is None:
            return 0
        self.pool.restore(self.prefix_cache.restore_snapshot(hit), sched_req.slot_ids[0])
        request.num_cached_tokens = hit.num_tokens
        if hit.num_tokens == len(request.prompt_ids):
            request.cached_first_logits = hit.entry.last_logits.to(self.model.device)
        return hit.num_tokens

    def _on_admitted(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for request_id in plan.admitted:
            request = self.requests[request_id]
            request.metrics.first_scheduled_time = now
            for choice, slot in zip(request.choices, self.scheduler.running[request_id].slot_ids, strict=True):
                choice.slot_id = slot

    def _execute(self, plan: StepPlan) -> _StepResults:
        """Run the model; a failure ends only the requests it touched (reported in the results)."""
        results = _StepResults(decode_logits=None, decode_error=None, prefill_logits={}, boundary_snapshots={})
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
                if self.prefix_cache is not None and seg.end % self.model.config.chunk_size == 0:
                    results.boundary_snapshots[seg] = self.pool.snapshot(seg.slot_id)
            except Exception as exc:  # noqa: BLE001
                logger.exception("prefill of %s failed", seg.request_id)
                results.prefill_logits[seg] = f"prefill failed: {exc}"
        return results

    def _update(self, plan: StepPlan, results: _StepResults) -> tuple[list[RequestOutput], int]:
        """Apply a step's results; returns the outputs and the number of tokens sampled."""
        touched: dict[str, Request] = {}
        rows: list[Tensor] = []
        row_targets: list[tuple[Request, Choice]] = []
        for request_id in plan.admitted:
            request = self.requests.get(request_id)
            if request is not None and request.cached_first_logits is not None:
                touched[request_id] = request  # the whole prompt came from the cache: sample at once
                self.scheduler.on_prefilled(request_id, 0)
                self._start_decoding(request, request.cached_first_logits, rows, row_targets)
        for seg, logits in results.prefill_logits.items():
            request = self.requests.get(seg.request_id)
            if request is None or seg.request_id in self._pending_aborts:
                continue
            touched[seg.request_id] = request
            if isinstance(logits, str):
                self._fail(request, logits)
                continue
            if request.prompt_logprobs is not None:
                self._accumulate_prompt_logprobs(request, seg, logits)
            if seg in results.boundary_snapshots:
                self._store_boundary(request, request.prompt_ids[:seg.end], results.boundary_snapshots[seg],
                                     last_logits=logits[-1])
            if self.scheduler.on_prefilled(seg.request_id, seg.num_tokens):
                self._start_decoding(request, logits[-1], rows, row_targets)
        for row, item in enumerate(plan.decodes):
            request = self.requests.get(item.request_id)
            if request is None or item.request_id in self._pending_aborts:
                continue
            touched[item.request_id] = request
            if results.decode_error is not None:
                self._fail(request, results.decode_error)
                continue
            choice = request.choice_for_slot(item.slot_id)
            fed = request.processed_tokens(choice)
            if self.prefix_cache is not None and len(fed) % self.model.config.chunk_size == 0:
                self._store_boundary(request, fed, self.pool.snapshot(item.slot_id))
            rows.append(results.decode_logits[row])
            row_targets.append((request, choice))
        self._sample_and_append(rows, row_targets)
        return self._collect_outputs(touched), len(rows)

    def _start_decoding(self, request: Request, last_logits: Tensor, rows: list[Tensor],
                        row_targets: list[tuple[Request, Choice]]) -> None:
        request.prompt_complete = True
        slots = self.scheduler.running[request.request_id].slot_ids
        if request.max_tokens == 0:  # scoring only (echo with max_tokens=0)
            request.finish_all("length")
            self.scheduler.finish_request(request.request_id)
            return
        for slot in slots[1:]:
            self.pool.copy_slot(slots[0], slot)  # n > 1: one prefill, n independent continuations
        for choice in request.choices:
            rows.append(last_logits)
            row_targets.append((request, choice))

    def _sample_and_append(self, rows: list[Tensor], row_targets: list[tuple[Request, Choice]]) -> None:
        if not rows:
            return
        logits = torch.stack(rows)
        if self._num_untokenizable:
            # a padded embedding table: ids past the tokenizer's vocabulary can never be emitted
            logits[:, -self._num_untokenizable:] = float("-inf")
        sampled: SampleOutput = sample(logits, [choice.sampler for _, choice in row_targets])
        now = time.monotonic()
        for i, (request, choice) in enumerate(row_targets):
            token_id = sampled.token_ids[i]
            logprob = None
            if sampled.logprobs[i] is not None:
                logprob = TokenLogprob(token_id, sampled.logprobs[i], sampled.top_logprobs[i] or [])
            fed = request.processed_tokens(choice)
            request.append_token(choice, token_id, logprob, now)
            if choice.finish_reason is not None:
                if self.prefix_cache is not None:
                    # the complete state after every token it consumed, and the logits it ended on
                    self.prefix_cache.insert_final(fed, self.pool.snapshot(choice.slot_id), logits[i])
                self.scheduler.finish_sequence(request.request_id, choice.slot_id)

    def _store_boundary(self, request: Request, tokens: list[int], snapshot: SlotSnapshot,
                        last_logits: Tensor | None = None) -> None:
        """At a chunk boundary the state is tiny (no KV): keep it for requests sharing this prefix."""
        entry = self.prefix_cache.insert_boundary(tokens, snapshot, pin=True, last_logits=last_logits)
        if entry is not None:
            request.pinned_entries.append(entry)

    def _release(self, request: Request) -> None:
        """A request ended: the cache entries it pinned may be evicted again."""
        if self.prefix_cache is not None:
            for entry in request.pinned_entries:
                self.prefix_cache.unpin(entry)
        request.pinned_entries.clear()

    def _accumulate_prompt_logprobs(self, request: Request, seg: PrefillSegment, logits: Tensor) -> None:
        """Score prompt tokens seg.start .. seg.end-1; the last row of a segment scores the next one."""
        prompt = request.prompt_ids
        k = request.params.prompt_logprobs
        rows = logits[:-1]
        targets = prompt[seg.start + 1:seg.end]
        if seg.start > 0:
            rows = torch.cat([request.prev_prompt_row, rows])
            targets = [prompt[seg.start], *targets]
        if targets:
            chosen, tops = token_logprobs(rows, targets, k)
            request.prompt_logprobs.logprobs.extend(chosen)
            request.prompt_logprobs.top_logprobs.extend(tops)
        request.prev_prompt_row = logits[-1:]

    def _fail(self, request: Request, message: str) -> None:
        request.error = message
        request.finish_all("error")
        self.scheduler.finish_request(request.request_id)

    def _collect_outputs(self, touched: dict[str, Request]) -> list[RequestOutput]:
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
        return outputs
