"""Recurrent-state prefix cache: resume a request from the longest stored prefix of its prompt.

At a chunk boundary a Megalodon request's whole context is a few small tensors (CEMA states and norm
statistics; the KV is empty), so the cache stores one immutable snapshot per chunk boundary, in a
tree keyed by a hash chain over the token blocks. A finished request also leaves its complete state
(partial chunk's KV and its last logits included), hung off the boundary node below it, so the next
turn of a chat resumes exactly where the previous one stopped.

Matching is exact: every step down the tree compares token ids, never only hashes. Entries live in
a device tier and, when evicted from it, a host tier, each with a byte budget and LRU eviction of
leaves (a node whose descendants are stored is never dropped first). Entries pinned by a running
request are not evicted. Knows nothing of requests or schedulers: only tokens and snapshots.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .state_pool import SlotSnapshot


@dataclass(eq=False)
class CacheEntry:
    """A snapshot after `num_tokens` tokens, with the logits of its last position when known.

    Boundary entries (num_tokens % C == 0, KV empty) form the tree; final entries hang below them."""

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

    @property
    def nbytes(self) -> int:
        extra = 0 if self.last_logits is None else self.last_logits.numel() * self.last_logits.element_size()
        return self.snapshot.nbytes() + extra

    @property
    def is_leaf(self) -> bool:
        return not self.children and not self.finals


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
        self.root_children: dict[tuple[int, ...], CacheEntry] = {}
        self.root_finals: dict[tuple[int, ...], CacheEntry] = {}
        self.stats = CacheStats()
        self._clock = itertools.count(1)
        self._entries: set[CacheEntry] = set()

    # ---------------------------------------------------------------------------------- sizes
    def stored_bytes(self, on_host: bool | None = None) -> int:
        return sum(e.nbytes for e in self._entries if on_host is None or e.on_host == on_host)

    def __len__(self) -> int:
        return len(self._entries)

    # --------------------------------------------------------------------------------- lookup
    def lookup(self, tokens: Sequence[int], allow_full: bool = True) -> CacheHit | None:
        """The longest stored state whose tokens are a prefix of `tokens` (exact comparison).

        A hit covering all of `tokens` is returned only when `allow_full` and the entry has the
        logits of its last position (so the caller can sample without computing anything).
        """
        self.stats.queried_tokens += len(tokens)
        C = self.chunk_size
        best: CacheEntry | None = None
        children, finals, depth = self.root_children, self.root_finals, 0
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
        if best is None:
            return None
        self._touch(best)
        self.stats.hit_tokens += best.num_tokens
        return CacheHit(best, best.num_tokens)

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

    def restore_snapshot(self, hit: CacheHit) -> SlotSnapshot:
        """The hit's snapshot on the cache's device (a host-tier entry is copied up, not moved)."""
        snapshot = hit.entry.snapshot
        return snapshot.to(self.device) if hit.entry.on_host else snapshot

    # --------------------------------------------------------------------------------- insert
    def insert_boundary(self, tokens: Sequence[int], snapshot: SlotSnapshot, pin: bool = False,
                        last_logits: Tensor | None = None) -> CacheEntry | None:
        """Store the state after `tokens` (a multiple of chunk_size long), with the logits of its last
        position when known (a prompt ending here is then served whole). Returns the entry, or None
        if the chain above it is not stored (a boundary is only useful below its parent)."""
        C = self.chunk_size
        if len(tokens) % C or not tokens:
            raise ValueError("boundary snapshots are taken at multiples of chunk_size")
        _check_position(tokens, snapshot)
        parent = self._find_boundary(tokens[:-C])
        if parent is None and len(tokens) > C:
            return None
        siblings = self.root_children if parent is None else parent.children
        block = tuple(tokens[-C:])
        entry = siblings.get(block)
        if entry is None:
            entry = CacheEntry(len(tokens), block, snapshot, parent,
                               last_logits=None if last_logits is None else last_logits.detach().clone())
            if not self._make_room(entry.nbytes):
                return None
            siblings[block] = entry
            self._entries.add(entry)
        self._touch(entry)
        if pin:
            entry.pins += 1
        return entry

    def insert_final(self, tokens: Sequence[int], snapshot: SlotSnapshot, last_logits: Tensor | None) -> None:
        """Store a finished request's complete state after `tokens` (any length)."""
        C = self.chunk_size
        if not tokens:
            return
        _check_position(tokens, snapshot)
        depth = (len(tokens) // C) * C
        if depth == len(tokens):
            depth -= C  # exactly on a boundary: hang it as a C-token tail of the boundary above
        parent = self._find_boundary(tokens[:depth]) if depth > 0 else None
        if parent is None:
            depth = 0  # no boundary chain above it (e.g. a restored session): key it by all its tokens
        finals = self.root_finals if parent is None else parent.finals
        tail = tuple(tokens[depth:])
        old = finals.pop(tail, None)
        if old is not None:
            self._entries.discard(old)
        entry = CacheEntry(len(tokens), tail, snapshot, parent, is_final=True,
                           last_logits=None if last_logits is None else last_logits.detach().clone())
        if not self._make_room(entry.nbytes):
            return
        finals[tail] = entry
        self._entries.add(entry)
        self._touch(entry)

    def unpin(self, entry: CacheEntry) -> None:
        entry.pins = max(0, entry.pins - 1)

    def _find_boundary(self, tokens: Sequence[int]) -> CacheEntry | None:
        C = self.chunk_size
        node, children = None, self.root_children
        for start in range(0, len(tokens), C):
            node = children.get(tuple(tokens[start:start + C]))
            if node is None:
                return None
            children = node.children
        return node

    def _touch(self, entry: CacheEntry | None) -> None:
        stamp = next(self._clock)
        while entry is not None:  # a node is used whenever anything below it is
            entry.last_used = stamp
            entry = entry.parent

    # ------------------------------------------------------------------------------ eviction
    def _make_room(self, nbytes: int) -> bool:
        """Evict LRU leaves until `nbytes` more fit on the device tier. False if it cannot fit."""
        if nbytes > self.device_bytes:
            return False
        while self.stored_bytes(on_host=False) + nbytes > self.device_bytes:
            victim = self._lru_leaf(on_host=False)
            if victim is None:
                return False
            self._demote(victim)
        return True

    def _lru_leaf(self, on_host: bool) -> CacheEntry | None:
        """Least recently used unpinned entry of a tier that nothing on the same tier hangs below.

        Device tier: its descendants may already sit on the host tier (they go there first). Host
        tier: only true leaves, so dropping never takes a device-tier (possibly pinned) child along.
        """
        def evictable(e: CacheEntry) -> bool:
            below = list(itertools.chain(e.children.values(), e.finals.values()))
            return e.on_host == on_host and e.pins == 0 and (all(c.on_host for c in below) if not on_host
                                                              else not below)

        return min((e for e in self._entries if evictable(e)), key=lambda e: e.last_used, default=None)

    def _demote(self, entry: CacheEntry) -> None:
        """Move an entry to the host tier if it fits there, else drop it."""
        self.stats.evictions += 1
        if self.host_bytes and entry.nbytes <= self.host_bytes:
            while self.stored_bytes(on_host=True) + entry.nbytes > self.host_bytes:
                victim = self._lru_leaf(on_host=True)
                if victim is None or victim is entry:
                    break
                self._drop(victim)
            if self.stored_bytes(on_host=True) + entry.nbytes <= self.host_bytes:
                entry.snapshot = entry.snapshot.to("cpu")
                if entry.last_logits is not None:
                    entry.last_logits = entry.last_logits.cpu()
                entry.on_host = True
                return
        self._drop(entry)

    def _drop(self, entry: CacheEntry) -> None:
        for child in list(itertools.chain(entry.children.values(), entry.finals.values())):
            self._drop(child)
        if entry.parent is None:
            siblings = self.root_finals if entry.is_final else self.root_children
        else:
            siblings = entry.parent.finals if entry.is_final else entry.parent.children
        siblings.pop(entry.tokens, None)
        self._entries.discard(entry)


def _check_position(tokens: Sequence[int], snapshot: SlotSnapshot) -> None:
    # a state stored under the wrong tokens would silently corrupt every request that hits it
    if snapshot.position != len(tokens):
        raise ValueError(f"snapshot at position {snapshot.position} stored under {len(tokens)} tokens")
