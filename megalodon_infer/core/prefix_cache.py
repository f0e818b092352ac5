"""Recurrent-state prefix cache: resume a request from the longest stored prefix of its prompt.

At a chunk boundary a Megalodon request's whole context is a few small tensors (CEMA states and norm
statistics; the KV is empty), so the cache stores one immutable snapshot per chunk boundary, in a
tree keyed by token blocks. A finished request also leaves its complete state (partial chunk's KV
and its last logits included), hung off the boundary node below it, so the next turn of a chat
resumes exactly where the previous one stopped.

Matching is exact: every step down the tree compares token ids, never only hashes. Each namespace
(vLLM's `cache_salt`, and the API key when tenants are isolated) has a tree of its own, so a
request never finds, or learns of, another namespace's prefixes. Entries live in
a device tier and, when evicted from it, a host tier, each with a byte budget and LRU eviction of
leaves (a node whose descendants are stored on its tier is never dropped first). Entries pinned by a
running request are not evicted. Byte counts are kept as running totals and evictable entries in a
heap per tier, so an insert never scans the cache. Knows nothing of requests or schedulers: only
tokens and snapshots.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megalodon_infer.core.state_pool import SlotSnapshot

DEVICE, HOST = False, True  # the `on_host` value of each tier


@dataclass(eq=False)
class CacheEntry:
    """A snapshot after `num_tokens` tokens, with the logits of its last position when known.

    Boundary entries (num_tokens % C == 0, KV empty) form the tree; final entries hang below them.

    NOTE: `last_used` is the entry's own last use, raised to a child's when that child leaves the
    entry's tier: while an entry has children on its tier it cannot be evicted anyway, so this makes
    its stamp the most recent use of its whole subtree exactly when the stamp starts to matter.
    """

    num_tokens: int
    tokens: tuple[int, ...]  # the block (boundary entry) or the tail after the parent boundary (final entry)
    snapshot: SlotSnapshot
    parent: CacheEntry | None
    last_logits: Tensor | None = None
    is_final: bool = False
    children: dict[tuple[int, ...], CacheEntry] = field(default_factory=dict)  # next boundary blocks
    finals: dict[tuple[int, ...], CacheEntry] = field(default_factory=dict)  # tails of finished requests
    last_used: int = 0
    pins: int = 0
    on_host: bool = False
    nbytes: int = 0
    namespace: str = ""  # the tree it belongs to

    def below(self) -> Iterator[CacheEntry]:
        yield from self.children.values()
        yield from self.finals.values()


def _entry_bytes(snapshot: SlotSnapshot, last_logits: Tensor | None) -> int:
    extra = 0 if last_logits is None else last_logits.numel() * last_logits.element_size()
    return snapshot.nbytes() + extra


@dataclass
class CacheHit:
    entry: CacheEntry
    num_tokens: int


@dataclass
class CacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, chunk_size: int, device_bytes: int, host_bytes: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.chunk_size = chunk_size
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        self.device = torch.device(device)
        # namespace -> (boundary blocks at depth 0, finals hung at the root)
        self._roots: dict[str, tuple[dict[tuple[int, ...], CacheEntry], dict[tuple[int, ...], CacheEntry]]] = {}
        self.stats = CacheStats()
        self._clock = itertools.count(1)
        self._entries: set[CacheEntry] = set()
        self._bytes = {DEVICE: 0, HOST: 0}
        self._num_entries = {DEVICE: 0, HOST: 0}
        # Candidates for eviction per tier: (last_used, tie-breaker, entry). Stale items (the entry
        # changed since) are skipped when popped, so every change costs one push, never a scan.
        self._heaps: dict[bool, list[tuple[int, int, CacheEntry]]] = {DEVICE: [], HOST: []}
        self._tiebreak = itertools.count()

    # ---------------------------------------------------------------------------------- sizes
    def stored_bytes(self, on_host: bool | None = None) -> int:
        return self._bytes[DEVICE] + self._bytes[HOST] if on_host is None else self._bytes[on_host]

    def num_entries(self, on_host: bool | None = None) -> int:
        return len(self._entries) if on_host is None else self._num_entries[on_host]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: CacheEntry) -> bool:
        return entry in self._entries

    # --------------------------------------------------------------------------------- lookup
    def _root(self, namespace: str, create: bool = False
              ) -> tuple[dict[tuple[int, ...], CacheEntry], dict[tuple[int, ...], CacheEntry]]:
        """A namespace's root dicts (empty, and not kept, for a namespace that holds nothing yet)."""
        root = self._roots.get(namespace)
        if root is None:
            root = ({}, {})
            if create:
                self._roots[namespace] = root
        return root

    def lookup(self, tokens: Sequence[int], allow_full: bool = True, namespace: str = "") -> CacheHit | None:
        """The longest stored state whose tokens are a prefix of `tokens` (exact comparison).

        A hit covering all of `tokens` is returned only when `allow_full` and the entry has the
        logits of its last position (so the caller can sample without computing anything).
        """
        self.stats.queried_tokens += len(tokens)
        best = self._search(tokens, allow_full, namespace)
        if best is None:
            return None
        self._touch(best)
        self.stats.hit_tokens += best.num_tokens
        return CacheHit(best, best.num_tokens)

    def stored_length(self, tokens: Sequence[int], namespace: str = "") -> int:
        """How many tokens of `tokens` the best `lookup` hit would cover (0: none), without counting
        a query or touching the entry (a peek, e.g. before asking a slower store)."""
        best = self._search(tokens, True, namespace)
        return 0 if best is None else best.num_tokens

    def _search(self, tokens: Sequence[int], allow_full: bool, namespace: str) -> CacheEntry | None:
        C = self.chunk_size
        best: CacheEntry | None = None
        (children, finals), depth = self._root(namespace), 0
        while True:
            best = self._best_final(finals, tokens, depth, best, allow_full)
            block = tuple(tokens[depth:depth + C])
            node = children.get(block) if len(block) == C else None
            if node is None:
                break
            whole = node.num_tokens == len(tokens)
            if not whole or (allow_full and node.last_logits is not None):
                if best is None or node.num_tokens > best.num_tokens:
                    best = node
            if whole:
                break
            children, finals, depth = node.children, node.finals, depth + C
        return best

    def _best_final(self, finals: dict[tuple[int, ...], CacheEntry], tokens: Sequence[int], depth: int,
                    best: CacheEntry | None, allow_full: bool) -> CacheEntry | None:
        for tail, entry in finals.items():
            end = depth + len(tail)
            if end > len(tokens) or (best is not None and entry.num_tokens <= best.num_tokens):
                continue
            if end == len(tokens) and not (allow_full and entry.last_logits is not None):
                continue
            if tuple(tokens[depth:end]) == tail:
                best = entry
        return best

    def match_length(self, tokens: Sequence[int], namespace: str = "") -> int:
        """How many leading tokens of `tokens` some stored path agrees with, stored state or not.

        A request that diverges from a cached path inside a chunk (a shared system prompt or
        document shorter than a chunk, or ending inside one) snapshots its state at this point, so
        the next request sharing the prefix finds it (a junction): the prefix is computed at most
        twice. Token comparison, never hashes.
        """
        C = self.chunk_size
        best = 0
        (children, finals), depth = self._root(namespace), 0
        while True:
            for tail in finals:
                best = max(best, depth + _common_prefix(tokens, depth, tail))
            block = tuple(tokens[depth:depth + C])
            node = children.get(block) if len(block) == C else None
            if node is None:
                for key in children:
                    best = max(best, depth + _common_prefix(tokens, depth, key))
                return min(best, len(tokens))
            children, finals, depth = node.children, node.finals, depth + C
            best = max(best, depth)

    def restore_snapshot(self, hit: CacheHit) -> SlotSnapshot:
        """The hit's snapshot on the cache's device (a host-tier entry is copied up, not moved)."""
        snapshot = hit.entry.snapshot
        return snapshot.to(self.device) if hit.entry.on_host else snapshot

    def boundary_of(self, entry: CacheEntry) -> CacheEntry | None:
        """The boundary node a request resuming from `entry` continues under (None: the root)."""
        return entry.parent if entry.is_final else entry

    # --------------------------------------------------------------------------------- insert
    def insert_boundary(self, parent: CacheEntry | None, block: Sequence[int], snapshot: SlotSnapshot,
                        pin: bool = False, last_logits: Tensor | None = None, namespace: str = "") -> CacheEntry | None:
        """Store the state after `parent`'s tokens + `block` (one whole chunk), with the logits of
        its last position when known (a prompt ending here is then served whole).

        `parent` is the boundary entry the state continued from (None: the start of the context),
        which the caller keeps from its previous insert or its cache hit, so storing a boundary
        costs O(C) whatever the context length. Returns the entry (the existing one if the same
        block is stored already), or None when `parent` is no longer cached or nothing fits.
        """
        C = self.chunk_size
        if len(block) != C:
            raise ValueError(f"a boundary block is exactly chunk_size ({C}) tokens, got {len(block)}")
        if parent is not None and parent not in self._entries:
            return None  # evicted meanwhile: a boundary is only reachable below its parent
        depth = 0 if parent is None else parent.num_tokens
        _check_position(depth + C, snapshot)
        namespace = namespace if parent is None else parent.namespace
        siblings = self._root(namespace, create=True)[0] if parent is None else parent.children
        key = tuple(block)
        entry = siblings.get(key)
        if entry is None:
            logits = None if last_logits is None else last_logits.detach().clone()
            entry = CacheEntry(depth + C, key, snapshot, parent, last_logits=logits,
                               nbytes=_entry_bytes(snapshot, logits), namespace=namespace)
            if not self._make_room(entry.nbytes):
                return None
            siblings[key] = entry
            self._add(entry)
        if pin:
            entry.pins += 1
        self._touch(entry)
        return entry

    def insert_final(self, tokens: Sequence[int], snapshot: SlotSnapshot, last_logits: Tensor | None,
                     namespace: str = "") -> None:
        """Store a finished request's complete state after `tokens` (any length)."""
        C = self.chunk_size
        if not tokens:
            return
        _check_position(len(tokens), snapshot)
        depth = (len(tokens) // C) * C
        if depth == len(tokens):
            depth -= C  # exactly on a boundary: hang it as a C-token tail of the boundary above
        parent = self._find_boundary(tokens[:depth], namespace) if depth > 0 else None
        if parent is None:
            depth = 0  # no boundary chain above it (e.g. a restored session): key it by all its tokens
        finals = self._root(namespace, create=True)[1] if parent is None else parent.finals
        tail = tuple(tokens[depth:])
        old = finals.pop(tail, None)
        if old is not None:
            self._remove(old)
        logits = None if last_logits is None else last_logits.detach().clone()
        entry = CacheEntry(len(tokens), tail, snapshot, parent, is_final=True, last_logits=logits,
                           nbytes=_entry_bytes(snapshot, logits), namespace=namespace)
        if not self._make_room(entry.nbytes):
            return
        finals[tail] = entry
        self._add(entry)
        self._touch(entry)

    def pin(self, entry: CacheEntry) -> None:
        entry.pins += 1

    def unpin(self, entry: CacheEntry) -> None:
        entry.pins = max(0, entry.pins - 1)
        self._offer(entry)

    def _find_boundary(self, tokens: Sequence[int], namespace: str) -> CacheEntry | None:
        C = self.chunk_size
        node, children = None, self._root(namespace)[0]
        for start in range(0, len(tokens), C):
            node = children.get(tuple(tokens[start:start + C]))
            if node is None:
                return None
            children = node.children
        return node

    # ------------------------------------------------------------------------------ bookkeeping
    def _add(self, entry: CacheEntry) -> None:
        self._entries.add(entry)
        self._bytes[entry.on_host] += entry.nbytes
        self._num_entries[entry.on_host] += 1

    def _remove(self, entry: CacheEntry) -> None:
        """Forget one entry (its own children must be gone already)."""
        self._entries.discard(entry)
        self._bytes[entry.on_host] -= entry.nbytes
        self._num_entries[entry.on_host] -= 1
        self._left_tier(entry)

    def _left_tier(self, entry: CacheEntry) -> None:
        """`entry` left its parent's tier: the parent inherits its stamp and may become evictable."""
        parent = entry.parent
        if parent is not None and parent in self._entries:
            parent.last_used = max(parent.last_used, entry.last_used)
            self._offer(parent)

    def _touch(self, entry: CacheEntry) -> None:
        entry.last_used = next(self._clock)
        self._offer(entry)

    def _evictable(self, entry: CacheEntry) -> bool:
        """Unpinned, and nothing on its tier hangs below it. Device tier: its descendants may already
        sit on the host tier (they go there first). Host tier: only true leaves, so dropping never
        takes a device-tier (possibly pinned) child along."""
        if entry.pins or entry not in self._entries:
            return False
        if entry.on_host:
            return not entry.children and not entry.finals
        return all(child.on_host for child in entry.below())

    def _offer(self, entry: CacheEntry) -> None:
        if self._evictable(entry):
            heapq.heappush(self._heaps[entry.on_host], (entry.last_used, next(self._tiebreak), entry))

    def _pop_lru(self, on_host: bool) -> CacheEntry | None:
        heap = self._heaps[on_host]
        while heap:
            stamp, _, entry = heapq.heappop(heap)
            if entry.last_used == stamp and entry.on_host == on_host and self._evictable(entry):
                return entry
        return None

    # ------------------------------------------------------------------------------ eviction
    def _make_room(self, nbytes: int) -> bool:
        """Evict LRU leaves until `nbytes` more fit on the device tier. False if it cannot fit."""
        if nbytes > self.device_bytes:
            return False
        while self._bytes[DEVICE] + nbytes > self.device_bytes:
            victim = self._pop_lru(DEVICE)
            if victim is None:
                return False
            self._demote(victim)
        return True

    def _demote(self, entry: CacheEntry) -> None:
        """Move an entry to the host tier if it fits there, else drop it."""
        self.stats.evictions += 1
        if self.host_bytes and entry.nbytes <= self.host_bytes:
            while self._bytes[HOST] + entry.nbytes > self.host_bytes:
                victim = self._pop_lru(HOST)
                if victim is None:
                    break
                self._drop(victim)
            if self._bytes[HOST] + entry.nbytes <= self.host_bytes:
                self._bytes[DEVICE] -= entry.nbytes
                self._num_entries[DEVICE] -= 1
                entry.snapshot = entry.snapshot.to("cpu")
                if entry.last_logits is not None:
                    entry.last_logits = entry.last_logits.cpu()
                entry.on_host = True
                self._bytes[HOST] += entry.nbytes
                self._num_entries[HOST] += 1
                self._left_tier(entry)
                self._offer(entry)
                return
        self._drop(entry)

    def _drop(self, entry: CacheEntry) -> None:
        for child in list(entry.below()):
            self._drop(child)
        if entry.parent is None:
            children, finals = self._root(entry.namespace)
            (finals if entry.is_final else children).pop(entry.tokens, None)
            if not children and not finals:  # a namespace that holds nothing is not kept
                self._roots.pop(entry.namespace, None)
        else:
            (entry.parent.finals if entry.is_final else entry.parent.children).pop(entry.tokens, None)
        self._remove(entry)


def _common_prefix(tokens: Sequence[int], start: int, stored: tuple[int, ...]) -> int:
    """Length of the common prefix of tokens[start:] and `stored`, by binary search over slice
    comparisons (each a C-speed tuple compare)."""
    low, high = 0, min(len(stored), len(tokens) - start)
    while low < high:
        mid = (low + high + 1) // 2
        if tuple(tokens[start:start + mid]) == stored[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _check_position(num_tokens: int, snapshot: SlotSnapshot) -> None:
    # a state stored under the wrong tokens would silently corrupt every request that hits it
    if snapshot.position != num_tokens:
        raise ValueError(f"snapshot at position {snapshot.position} stored under {num_tokens} tokens")
