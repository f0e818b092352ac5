"""Who runs this step, and how many tokens each: a pure policy over ints, lists and dicts.

NOTE: there is no prefill phase and decode phase. Every step decodes one token for every running
sequence, then spends what is left of the token budget on prefill, oldest request first. Prefill is
cut into segments that never cross an absolute multiple of chunk_size: each ends at a chunk
boundary (where the state is small enough to cache), the prompt's end, or the budget's end. Admission is strictly first
come, first served by free slots, so no request starves. Knows nothing of tensors or text.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class SlotAllocator(Protocol):
    """What the scheduler needs from the state pool."""

    @property
    def num_free(self) -> int: ...

    def can_alloc(self, num_slots: int = 1) -> bool: ...

    def alloc(self) -> int: ...

    def free(self, slot: int) -> None: ...


class AddResult(enum.Enum):
    ADDED = "added"
    OVERLOADED = "overloaded"  # the waiting queue is full: the caller answers 429/503


class SchedRequest:
    """The part of a request the scheduler reads and writes: n sequences sharing one prompt
    (prefilled once, in slot_ids[0]). The engine's request object extends this class, so a request
    is one object from admission to output."""

    def __init__(self, request_id: str, num_prompt_tokens: int, num_seqs: int = 1) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.num_seqs = num_seqs
        self.num_computed_tokens = 0  # prompt tokens already in the state (restored from a cache too)
        self.slot_ids: list[int] = []  # slot_ids[0] holds the prefill
        self.running_slots: list[int] = []  # sequences still decoding
        self.cut_at: int | None = None  # a prompt position where a prefill segment must end (a snapshot)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass(frozen=True)
class PrefillSegment:
    request_id: str
    slot_id: int
    start: int  # first prompt index of the segment
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class DecodeItem:
    request_id: str
    slot_id: int


@dataclass
class StepPlan:
    """One engine step: a batched one-token decode plus prefill segments."""

    decodes: list[DecodeItem] = field(default_factory=list)
    prefills: list[PrefillSegment] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)  # requests that got their slots this step

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_tokens for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        # an admission is work too: a prompt found whole in the cache is sampled without a segment
        return not self.decodes and not self.prefills and not self.admitted


@dataclass(frozen=True)
class SchedulerConfig:
    chunk_size: int
    max_num_batched_tokens: int
    max_waiting_requests: int


class Scheduler:
    """`on_admit(request) -> int` runs when a request gets its slots and returns how many prompt
    tokens are already in its state (a prefix-cache hit restored into slot_ids[0]); prefill starts
    after them."""

    def __init__(self, config: SchedulerConfig, slots: SlotAllocator,
                 on_admit: Callable[[SchedRequest], int] | None = None) -> None:
        self.config = config
        self.slots = slots
        self.on_admit = on_admit
        self.waiting: deque[SchedRequest] = deque()
        self.running: dict[str, SchedRequest] = {}  # insertion order = admission order

    # ------------------------------------------------------------------------------- requests
    def add(self, request: SchedRequest) -> AddResult:
        """Queue a request, unless more than max_waiting_requests sequences would wait for a slot."""
        demand = sum(r.num_seqs for r in self.waiting) + request.num_seqs
        if demand - self.slots.num_free > self.config.max_waiting_requests:
            return AddResult.OVERLOADED
        self.waiting.append(request)
        return AddResult.ADDED

    def abort(self, request_id: str) -> bool:
        """Remove a request wherever it is, freeing its slots. False if it is not known."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return True
        req = self.running.pop(request_id, None)
        if req is None:
            return False
        for slot in req.slot_ids:
            self.slots.free(slot)
        return True

    # ---------------------------------------------------------------------------------- a step
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for req in self.running.values():
            if not req.is_prefilling:
                plan.decodes.extend(DecodeItem(req.request_id, slot) for slot in req.running_slots)
        self._admit(plan)
        budget = self.config.max_num_batched_tokens - len(plan.decodes)
        for req in self.running.values():
            if budget <= 0:
                break
            if req.is_prefilling:
                segments = self._prefill_segments(req, budget)
                plan.prefills.extend(segments)
                budget -= sum(seg.num_tokens for seg in segments)
        return plan

    def _admit(self, plan: StepPlan) -> None:
        while self.waiting and self.slots.can_alloc(self.waiting[0].num_seqs):
            req = self.waiting.popleft()
            req.slot_ids = [self.slots.alloc() for _ in range(req.num_seqs)]
            if self.on_admit is not None:
                req.num_computed_tokens = self.on_admit(req)
            self.running[req.request_id] = req
            plan.admitted.append(req.request_id)

    def _prefill_segments(self, req: SchedRequest, budget: int) -> list[PrefillSegment]:
        """Up to `budget` prompt tokens, one segment per chunk: each segment ends at an absolute
        multiple of chunk_size, the prompt's end, the request's `cut_at`, or where the budget runs out."""
        C = self.config.chunk_size
        segments = []
        start = req.num_computed_tokens
        while budget > 0 and start < req.num_prompt_tokens:
            end = min(req.num_prompt_tokens, start + budget, (start // C + 1) * C)
            if req.cut_at is not None and start < req.cut_at < end:
                end = req.cut_at
            segments.append(PrefillSegment(req.request_id, req.slot_ids[0], start, end - start))
            budget -= end - start
            start = end
        return segments

    # ------------------------------------------------------------------------- step results
    def on_prefilled(self, request_id: str, num_tokens: int) -> bool:
        """Record prefill progress; True when the prompt is now complete (sequences start decoding)."""
        req = self.running[request_id]
        req.num_computed_tokens += num_tokens
        if req.is_prefilling:
            return False
        req.running_slots = list(req.slot_ids)
        return True

    def finish_sequence(self, request_id: str, slot_id: int) -> bool:
        """A sequence stopped; its slot is free. True when it was the request's last sequence."""
        req = self.running[request_id]
        req.running_slots.remove(slot_id)
        req.slot_ids.remove(slot_id)
        self.slots.free(slot_id)
        if req.running_slots:
            return False
        for slot in req.slot_ids:  # a request finished without decoding (max_tokens=0)
            self.slots.free(slot)
        del self.running[request_id]
        return True

    def finish_request(self, request_id: str) -> None:
        """End a request with all its sequences (an error, or a prompt-only request)."""
        self.abort(request_id)

    # ------------------------------------------------------------------------------ counters
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(r.running_slots) if not r.is_prefilling else 1 for r in self.running.values())
