"""The scheduling policy alone: synthetic slots, no model, no torch."""

from __future__ import annotations

from megalodon_infer.core.scheduler import AddResult, SchedRequest, Scheduler, SchedulerConfig


class Slots:
    def __init__(self, n: int) -> None:
        self.free_ids = list(range(n))
        self.used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def can_alloc(self, num_slots: int = 1) -> bool:
        return len(self.free_ids) >= num_slots

    def alloc(self) -> int:
        slot = self.free_ids.pop(0)
        self.used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        self.used.remove(slot)
        self.free_ids.append(slot)


def make(slots=4, budget=16, chunk=8, waiting=10):
    s = Slots(slots)
    return Scheduler(SchedulerConfig(chunk_size=chunk, max_num_batched_tokens=budget,
                                     max_waiting_requests=waiting), s), s


def apply(sched, plan):
    for seg in plan.prefills:
        sched.on_prefilled(seg.request_id, seg.num_tokens)


def prefill_ends(sched, request_id, steps):
    ends = []
    for _ in range(steps):
        plan = sched.schedule()
        ends.append([seg.end for seg in plan.prefills if seg.request_id == request_id])
        apply(sched, plan)
    return ends


def test_prefill_segments_never_cross_a_chunk_boundary_and_use_the_budget():
    sched, _ = make(budget=13, chunk=8)
    sched.add(SchedRequest("a", num_prompt_tokens=30))
    assert prefill_ends(sched, "a", 3) == [[8, 13], [16, 24, 26], [30]]


def test_budget_smaller_than_a_chunk_still_progresses():
    sched, _ = make(budget=3, chunk=8, slots=2)
    sched.add(SchedRequest("a", num_prompt_tokens=10))
    assert prefill_ends(sched, "a", 4) == [[3], [6], [8, 9], [10]]


def test_decode_first_then_prefill_with_the_rest_of_the_budget():
    sched, _ = make(budget=6, chunk=64)
    sched.add(SchedRequest("a", num_prompt_tokens=2))
    apply(sched, sched.schedule())
    sched.add(SchedRequest("b", num_prompt_tokens=50))
    plan = sched.schedule()
    assert [d.request_id for d in plan.decodes] == ["a"]
    assert [(s.request_id, s.num_tokens) for s in plan.prefills] == [("b", 5)]


def test_fcfs_admission_never_lets_later_requests_overtake():
    sched, slots = make(slots=3)
    sched.add(SchedRequest("one", 4))
    sched.add(SchedRequest("big", 4, num_seqs=3))  # needs every slot
    sched.add(SchedRequest("small", 4))
    plan = sched.schedule()
    assert plan.admitted == ["one"]  # "small" would fit, but "big" is first in line
    apply(sched, plan)
    sched.finish_sequence("one", sched.running["one"].slot_ids[0])
    assert sched.schedule().admitted == ["big"]


def test_waiting_bound_gives_an_overloaded_result():
    sched, _ = make(slots=2, waiting=1)
    assert [sched.add(SchedRequest(str(i), 1)) for i in range(4)] == [AddResult.ADDED] * 3 + [AddResult.OVERLOADED]


def test_abort_frees_slots_wherever_the_request_is():
    sched, slots = make(slots=2)
    sched.add(SchedRequest("a", 20, num_seqs=2))
    sched.add(SchedRequest("b", 3))
    sched.schedule()
    assert slots.num_free == 0
    assert sched.abort("b") and sched.num_waiting == 0
    assert sched.abort("a") and slots.num_free == 2
    assert not sched.abort("a")


def test_n_sequences_decode_after_one_prefill_and_finish_one_by_one():
    sched, slots = make(slots=4)
    sched.add(SchedRequest("a", 5, num_seqs=3))
    plan = sched.schedule()
    assert len(plan.prefills) == 1 and plan.prefills[0].num_tokens == 5
    apply(sched, plan)
    plan = sched.schedule()
    assert sorted(d.slot_id for d in plan.decodes) == sorted(sched.running["a"].slot_ids)
    first, second, third = sched.running["a"].slot_ids
    assert not sched.finish_sequence("a", first) and slots.num_free == 2
    assert not sched.finish_sequence("a", second)
    assert sched.finish_sequence("a", third) and slots.num_free == 4 and not sched.running and not sched.waiting
