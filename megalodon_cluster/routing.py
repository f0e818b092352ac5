"""Which replica a conversation belongs to: its routing key, and consistent hashing with bounded load.

Pure policy, no Ray: `megalodon_cluster.router` applies it inside Ray Serve's request router, and
the tests drive it directly. A conversation's key is the `X-Session-Id` header, else the OpenAI
`user` field, else a Responses `previous_response_id` (mapped back to the key its conversation
started under when this front saw that response). Keys are placed on a hash ring of virtual
nodes; a key goes to the first replica clockwise whose load is under the bound
ceil(balance * (total + 1) / replicas) (Mirrokni, Thorup and Zadimoghaddam's bounded loads), so a
hot session overflows to the next replica instead of starving its own. A key that overflowed keeps
going where its last request went (`Placements`): that replica holds its state.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

SESSION_HEADER = "x-session-id"
BODY_KEYS = ("user", "previous_response_id")
DEFAULT_BALANCE = 1.25
DEFAULT_VIRTUAL_NODES = 100
# Response ids remembered per front (each a few dozen bytes): the last turns of this many conversations.
MAX_REMEMBERED_RESPONSES = 100_000


def _point(text: str) -> int:
    # NOTE: not Python's hash(), which is salted per process: every front must place keys alike.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def routing_key(headers: Mapping[str, str], body: bytes | None, responses: ResponseKeys | None = None) -> str | None:
    """The conversation key of a request (`headers` with lower-case names), or None for "any replica"."""
    header = headers.get(SESSION_HEADER, "").strip()
    if header:
        return header
    # Parse only bodies that can carry a key: a long prompt without one costs a substring search.
    if not body or not any(f'"{name}"'.encode() in body for name in BODY_KEYS):
        return None
    try:
        fields = json.loads(body)
    except ValueError:
        return None  # the app answers 400 for it
    if not isinstance(fields, dict):
        return None
    user = fields.get("user")
    if isinstance(user, str) and user.strip():
        return user.strip()
    previous = fields.get("previous_response_id")
    if isinstance(previous, str) and previous:
        return responses.key_of(previous) if responses is not None else previous
    return None


class ResponseKeys:
    """Response id -> the key its conversation is routed under, so each `previous_response_id` of a
    Responses conversation routes like the turn before it (the id changes every turn)."""

    def __init__(self, capacity: int = MAX_REMEMBERED_RESPONSES) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, str] = OrderedDict()

    def key_of(self, response_id: str) -> str:
        key = self._keys.get(response_id)
        if key is None:
            return response_id  # not seen here: the id itself keeps later turns together
        self._keys.move_to_end(response_id)
        return key

    def remember(self, response_id: str, key: str) -> None:
        self._keys[response_id] = key
        self._keys.move_to_end(response_id)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)


class Placements:
    """Conversation key -> the replica that served its last request (the one holding its state), for the
    last `capacity` conversations. A turn the load bound sent away from its ring owner leaves its state
    on that other replica; the next turn should follow the state, not the ring."""

    def __init__(self, capacity: int = MAX_REMEMBERED_RESPONSES) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[str, str] = OrderedDict()

    def holder(self, key: str) -> str | None:
        return self._holders.get(key)

    def record(self, key: str, member: str) -> None:
        self._holders[key] = member
        self._holders.move_to_end(key)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)


def affine_order(ring_order: Sequence[str], holder: str | None) -> list[str]:
    """`ring_order` with the replica holding the conversation's state (if it is still a member) first."""
    if holder is None or holder not in ring_order:
        return list(ring_order)
    return [holder, *(member for member in ring_order if member != holder)]


class HashRing:
    """Replicas (by id) on a ring of `virtual_nodes` points each."""

    def __init__(self, members: Iterable[str], virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        points = sorted((_point(f"{member}#{i}"), member) for member in set(members) for i in range(virtual_nodes))
        self.members = frozenset(member for _, member in points)
        self._hashes = [h for h, _ in points]
        self._owners = [member for _, member in points]

    def order(self, key: str) -> list[str]:
        """Every member once, clockwise from `key`'s point: its owner first."""
        if not self._hashes:
            return []
        start = bisect.bisect_right(self._hashes, _point(key))
        seen: dict[str, None] = {}
        for i in range(len(self._owners)):
            seen.setdefault(self._owners[(start + i) % len(self._owners)], None)
            if len(seen) == len(self.members):
                break
        return list(seen)


def bounded_choice(order: Sequence[str], loads: Mapping[str, int], balance: float = DEFAULT_BALANCE) -> list[str]:
    """`order` rotated to start at the first member below the load bound (the rest stay as fallbacks).

    With the new request counted, the mean load is (total + 1) / n, so some member is always below
    ceil(balance * mean) for balance >= 1.
    """
    if not order:
        return []
    total = sum(loads.get(member, 0) for member in order)
    bound = math.ceil(balance * (total + 1) / len(order))
    for index, member in enumerate(order):
        if loads.get(member, 0) + 1 <= bound:
            return [*order[index:], *order[:index]]
    return list(order)
