"""A state store shared by several engines: finished requests' final states, found again by token prefix.

Where several replicas serve one model, a conversation's state lives in the prefix cache of the
replica that ran its last turn. This store lets any replica find it: every finished request's
final state is written (by a writer thread, never on the engine thread) in the session format of
`core.sessions` (safetensors + the model's fingerprint), and a replica that receives a prompt it
holds no long prefix of looks the prompt up here before prefilling it.

Layout: `DIR/<fingerprint>/<anchor>/<tail>-<tail hash>.safetensors`. A state after n tokens hangs
below the chunk boundary a = C * ((n - 1) // C) before its end; `anchor` hashes the namespace and
the first a tokens, the file name carries the tail's length and its hash. A lookup hashes the
prompt once, boundary by boundary, lists at most one folder per boundary and compares the tokens
of a candidate exactly before using it (hashes only find candidates). Files over the byte budget
are deleted oldest-used first, by any replica. Knows nothing of requests: only tokens and snapshots.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from megalodon_infer.core.sessions import Session, SessionError, load_session, save_session
from megalodon_infer.core.state_pool import SlotSnapshot

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Writes queued beyond this are dropped oldest first: a store that cannot keep up must never hold
# the engine back, and a dropped write only costs a re-prefill if that conversation moves.
MAX_PENDING_WRITES = 64
# A replica re-measures the shared folder after writing this fraction of the budget (or every
# PRUNE_INTERVAL_S), so the folder stays near its budget however many replicas write to it.
PRUNE_FRACTION = 0.05
PRUNE_INTERVAL_S = 30.0


@dataclass
class StateStoreStats:
    written: int = 0
    dropped: int = 0  # writes given up because the queue was full
    failed: int = 0  # writes or reads that raised (logged)
    fetched: int = 0  # states found for a prompt
    fetched_tokens: int = 0
    pruned: int = 0  # files deleted to stay within the budget


@dataclass(frozen=True)
class _Write:
    namespace: str
    token_ids: tuple[int, ...]
    snapshot: SlotSnapshot
    last_logits: Tensor | None


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return array("q", token_ids).tobytes()


def _anchor_hashes(namespace: str, token_ids: Sequence[int], chunk_size: int) -> list[str]:
    """hex digest of (namespace, token_ids[:a]) for a = 0, C, 2C, ... < len(token_ids), in one pass."""
    h = hashlib.sha256(namespace.encode() + b"\0")
    digests = []
    for start in range(0, max(len(token_ids), 1), chunk_size):
        digests.append(h.hexdigest())
        h.update(_token_bytes(token_ids[start:start + chunk_size]))
    return digests


def _tail_hash(tail: Sequence[int]) -> str:
    return hashlib.sha256(_token_bytes(tail)).hexdigest()[:40]


class DirectoryStateStore:
    """States in a folder every replica can read (a local disk for one machine, a shared volume for many).

    `put` only queues (engine thread); `fetch` reads (call it without the engine lock). Thread-safe.
    """

    def __init__(self, directory: Path, fingerprint: str, chunk_size: int, max_bytes: int,
                 max_file_bytes: int = 1 << 30) -> None:
        self.root = Path(directory) / fingerprint
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self.stats = StateStoreStats()
        self._pending: deque[_Write] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._queued = 0  # puts so far; _settled: of those, written, failed or dropped (FIFO, so a prefix)
        self._settled = 0
        self._bytes_since_prune = 0
        self._last_prune = time.monotonic()
        self._writer = threading.Thread(target=self._write_loop, name="megalodon-state-store", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------------------- writes
    def put(self, namespace: str, token_ids: Sequence[int], snapshot: SlotSnapshot,
            last_logits: Tensor | None) -> None:
        """Queue the state after `token_ids` (immutable: the prefix cache holds the same snapshot)."""
        if not token_ids:
            return
        with self._cond:
            if self._closed:
                return
            if len(self._pending) >= MAX_PENDING_WRITES:
                self._pending.popleft()
                self.stats.dropped += 1
                self._settled += 1
            self._pending.append(_Write(namespace, tuple(token_ids), snapshot, last_logits))
            self._queued += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every write queued before this call is settled (on disk, failed or dropped);
        later ones are not waited for. False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._settled < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to `timeout` s), then stop the writer."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join(timeout=5)

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                item = self._pending.popleft()
            try:
                self._write(item)
            except Exception:  # noqa: BLE001 - a failed write costs a re-prefill, never the engine
                logger.exception("writing a state to %s failed", self.root)
                self.stats.failed += 1
            finally:
                with self._cond:
                    self._settled += 1
                    self._cond.notify_all()

    def _write(self, item: _Write) -> None:
        tokens = item.token_ids
        anchor_len = self.chunk_size * ((len(tokens) - 1) // self.chunk_size)
        folder = self._folder(_anchor_hashes(item.namespace, tokens[:anchor_len + 1], self.chunk_size)[-1])
        tail = tokens[anchor_len:]
        name = f"{len(tail)}-{_tail_hash(tail)}"
        path = save_session(folder, Session(name, list(tokens), item.snapshot, item.last_logits), self.fingerprint)
        self.stats.written += 1
        self._bytes_since_prune += path.stat().st_size
        if (self._bytes_since_prune > PRUNE_FRACTION * self.max_bytes
                or time.monotonic() - self._last_prune > PRUNE_INTERVAL_S):
            self.prune()

    def _folder(self, anchor: str) -> Path:
        return self.root / anchor[:2] / anchor

    # -------------------------------------------------------------------------------- reads
    def fetch(self, namespace: str, token_ids: Sequence[int], longer_than: int = 0) -> Session | None:
        """The longest stored state whose tokens are a prefix of `token_ids` and longer than
        `longer_than` tokens (what the caller already holds), or None. Blocking file reads."""
        C = self.chunk_size
        anchors = _anchor_hashes(namespace, token_ids, C)
        for index in range(len(anchors) - 1, -1, -1):
            start = index * C
            if start + C <= longer_than:
                break  # every state below this boundary is at most as long as what the caller has
            session = self._best_in(self._folder(anchors[index]), token_ids, start, longer_than)
            if session is not None:
                self.stats.fetched += 1
                self.stats.fetched_tokens += len(session.token_ids)
                return session
        return None

    def _best_in(self, folder: Path, token_ids: Sequence[int], start: int, longer_than: int) -> Session | None:
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return None
        candidates: list[tuple[int, str]] = []
        for file_name in names:
            length, _, digest = file_name.removesuffix(SUFFIX).partition("-")
            if not file_name.endswith(SUFFIX) or not length.isdigit():
                continue  # a temporary file of a write in progress
            end = start + int(length)
            if longer_than < end <= len(token_ids) and _tail_hash(token_ids[start:end]) == digest:
                candidates.append((end, file_name.removesuffix(SUFFIX)))
        for end, name in sorted(candidates, reverse=True):
            session = self._read(folder, name)
            # NOTE: the hashes only found the file; its own token ids decide, compared exactly.
            if session is not None and session.token_ids == list(token_ids[:end]):
                return session
        return None

    def _read(self, folder: Path, name: str) -> Session | None:
        try:
            session = load_session(folder, name, self.fingerprint, self.max_file_bytes)
            os.utime(folder / (name + SUFFIX))  # recently used: pruned last
        except (SessionError, OSError) as exc:  # pruned meanwhile, or damaged
            logger.warning("state %s/%s unusable: %s", folder.name, name, exc)
            self.stats.failed += 1
            return None
        return session

    # ------------------------------------------------------------------------------- budget
    def prune(self) -> int:
        """Delete the least recently used files until the folder fits the budget; returns bytes left."""
        files = []
        for path in self.root.glob(f"*/*/*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # another replica pruned it
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.stats.pruned += 1
        self._bytes_since_prune = 0
        self._last_prune = time.monotonic()
        return total
