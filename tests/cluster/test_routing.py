"""Routing policy without Ray: conversation keys, the hash ring, its load bound, and following a state."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from megalodon_cluster.routing import HashRing, Placements, ResponseKeys, affine_order, bounded_choice, routing_key


def body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_the_session_header_wins_then_user_then_previous_response_id():
    assert routing_key({"x-session-id": "s1"}, body(user="u1", previous_response_id="resp_1")) == "s1"
    assert routing_key({}, body(user="u1", previous_response_id="resp_1")) == "u1"
    assert routing_key({}, body(previous_response_id="resp_1")) == "resp_1"
    assert routing_key({"x-session-id": "  "}, body()) is None  # blank: no key
    assert routing_key({}, body(user="")) is None
    assert routing_key({}, b'{"user": 3}') is None and routing_key({}, b'["user"]') is None
    assert routing_key({}, b'{"user": "a",') is None  # broken JSON: the app answers 400
    assert routing_key({}, None) is None


def test_a_prompt_that_only_mentions_the_field_names_is_not_a_key():
    assert routing_key({}, json.dumps({"prompt": 'say "user" and "previous_response_id"'}).encode()) is None


def test_a_responses_conversation_keeps_the_key_it_started_under():
    keys = ResponseKeys(capacity=2)
    keys.remember("resp_2", "resp_1")  # turn 2 was routed as resp_1's successor
    assert routing_key({}, body(previous_response_id="resp_2"), keys) == "resp_1"
    keys.remember("resp_3", "resp_1")
    keys.remember("resp_9", "other")  # capacity 2: the least recently used id is forgotten
    assert keys.key_of("resp_2") == "resp_2" and keys.key_of("resp_3") == "resp_1"


def test_the_ring_is_stable_and_removing_a_replica_moves_only_its_keys():
    keys = [f"conversation-{i}" for i in range(2000)]
    three = HashRing(["a", "b", "c"])
    assert HashRing(["c", "a", "b"]).order("k") == three.order("k")  # any front places keys alike
    owners = {key: three.order(key)[0] for key in keys}
    shares = Counter(owners.values())
    assert min(shares.values()) > 0.2 * len(keys), shares  # 100 virtual nodes spread keys evenly enough
    two = HashRing(["a", "b"])
    for key in keys:
        if owners[key] != "c":
            assert two.order(key)[0] == owners[key]
    assert sorted(three.order("x")) == ["a", "b", "c"]
    assert HashRing([]).order("x") == []


def test_the_owner_takes_its_keys_until_it_is_over_the_bound():
    order = ["a", "b", "c"]
    assert bounded_choice(order, {"a": 0, "b": 0, "c": 0}) == ["a", "b", "c"]
    assert bounded_choice(order, {"a": 2, "b": 1, "c": 1}) == ["a", "b", "c"]  # 3 <= ceil(1.25 * 5 / 3) = 3
    assert bounded_choice(order, {"a": 3, "b": 1, "c": 1}) == ["b", "c", "a"]  # 4 > ceil(1.25 * 6 / 3) = 3
    assert bounded_choice(order, {"a": 9, "b": 9, "c": 0}) == ["c", "a", "b"]
    assert bounded_choice([], {}) == []


@pytest.mark.parametrize("balance", [1.0, 1.25, 2.0])
def test_one_hot_session_cannot_take_more_than_its_bound(balance):
    """Requests of one key pile up (none finishes): the owner stops at ceil(balance * mean)."""
    ring = HashRing(["a", "b", "c", "d"])
    loads = {m: 0 for m in ring.members}
    for sent in range(1, 101):
        loads[bounded_choice(ring.order("hot"), loads, balance)[0]] += 1
        assert max(loads.values()) <= math.ceil(balance * sent / len(loads))


def test_a_turn_that_overflowed_is_followed_by_the_next_one():
    """Turn 1 went to a non-owner (its owner was over the bound): turn 2 goes where the state is."""
    ring = HashRing(["a", "b", "c"])
    placements = Placements()
    order = ring.order("chat-9")
    owner, other = order[0], order[1]
    busy = {owner: 5, other: 0, order[2]: 0}
    first = bounded_choice(affine_order(order, placements.holder("chat-9")), busy)[0]
    assert first != owner
    placements.record("chat-9", first)
    idle = dict.fromkeys(order, 0)
    assert bounded_choice(affine_order(order, placements.holder("chat-9")), idle)[0] == first
    # the holder itself over the bound: the bound still wins, the ring order follows
    assert bounded_choice(affine_order(order, first), {**idle, first: 5})[0] == owner


def test_placements_forget_the_oldest_and_ignore_a_holder_that_left():
    placements = Placements(capacity=2)
    for key, member in (("k1", "a"), ("k2", "b"), ("k3", "c")):
        placements.record(key, member)
    assert placements.holder("k1") is None and placements.holder("k3") == "c"
    assert affine_order(["a", "b"], "c") == ["a", "b"]  # c left the ring
    assert affine_order(["a", "b", "c"], "c") == ["c", "a", "b"]
