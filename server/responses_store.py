"""Stored responses: what `previous_response_id` resumes, per tenant, bounded, optionally on disk.

A record keeps a finished response's exact token history (prompt ids + generated ids), the
conversation as chat messages (for the fallback that re-renders it), the instructions and tools the
prompt was rendered with, and the response object (for retrieval). The recurrent state itself lives
in the engine's prefix cache, found by the history's tokens; with a session directory the store also
writes it next to the record in the session format (`megalodon_infer.core.sessions`), so a
conversation survives a restart.

Bounds: at most `max_records` records and `max_bytes` bytes (records plus their state files), least
recently used dropped first (with their files). Records are scoped by tenant (the API key): another
key's id is unknown. Lives on the event loop; file work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("megalodon.server")

FORMAT = "megalodon-response"
FORMAT_VERSION = 1
_ID_RE = re.compile(r"^resp_[0-9a-f]{32}$")
STATE_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".json"


@dataclass
class StoredResponse:
    """One finished response, as the next turn needs it.

    `history_ids`: the prompt's ids then every generated id. `messages`: the conversation before the
    reply (instructions excluded); `reply`: the assistant message the response added.
    """

    id: str
    tenant: str
    response: dict[str, Any]
    history_ids: list[int]
    messages: list[dict[str, Any]]
    reply: dict[str, Any]
    instructions: str | None
    template_tools: list[dict[str, Any]] | None
    state_saved: bool = False  # a state file sits beside the record
    nbytes: int = field(default=0, compare=False)

    def size(self) -> int:
        text = json.dumps([self.response, self.messages, self.reply, self.template_tools], ensure_ascii=False)
        return len(text) + 8 * len(self.history_ids)


def valid_id(response_id: str) -> bool:
    return bool(_ID_RE.fullmatch(response_id))


class ResponseStore:
    """The records of every tenant. `directory` (the session directory's `responses/`) makes them
    persistent; None keeps them in memory only."""

    def __init__(self, max_records: int, max_bytes: int, directory: Path | None = None) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.directory = directory
        # (tenant, id) -> the record, or None while only its files are known (after a restart)
        self._records: OrderedDict[tuple[str, str], StoredResponse | None] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}
        self._bytes = 0
        self._tasks: set[asyncio.Task] = set()
        if directory is not None:
            self._index_disk(directory)

    # ---------------------------------------------------------------------------------- reads
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        key = (tenant, response_id)
        if key not in self._records:
            return None
        record = self._records[key]
        if record is None:  # known from disk only: read it now
            record = await asyncio.to_thread(self._read, tenant, response_id)
            if record is None:
                self._forget(key)
                return None
            self._records[key] = record
        self._records.move_to_end(key)
        return record

    def folder(self, tenant: str) -> Path | None:
        """Where a tenant's records and states are written (None: memory only)."""
        if self.directory is None:
            return None
        return self.directory / tenant if tenant else self.directory

    # --------------------------------------------------------------------------------- writes
    def put(self, record: StoredResponse, save_state: Callable[[Path], Awaitable[bool]] | None = None) -> None:
        """Keep `record`; with a directory, write it (and, through `save_state(folder)`, its state)
        in the background. Older records beyond the bounds are dropped."""
        key = (record.tenant, record.id)
        record.nbytes = record.size()
        self._set_size(key, record.nbytes)
        self._records[key] = record
        self._records.move_to_end(key)
        self._evict()
        folder = self.folder(record.tenant)
        if folder is not None and key in self._records:
            task = asyncio.get_running_loop().create_task(self._persist(record, folder, save_state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def delete(self, tenant: str, response_id: str) -> bool:
        key = (tenant, response_id)
        if key not in self._records:
            return False
        self._forget(key)
        return True

    async def drain(self) -> None:
        """Wait for background writes (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _persist(self, record: StoredResponse, folder: Path,
                       save_state: Callable[[Path], Awaitable[bool]] | None) -> None:
        try:
            await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
            if save_state is not None:
                record.state_saved = await save_state(folder)
            await asyncio.to_thread(self._write, record, folder)
        except Exception:  # noqa: BLE001 - the record still serves from memory
            logger.exception("writing response %s failed", record.id)
            return
        key = (record.tenant, record.id)
        if key in self._records:  # still kept (not deleted or evicted meanwhile)
            self._set_size(key, record.nbytes + self._state_bytes(folder, record.id))
            self._evict()
        else:
            self._remove_files(record.tenant, record.id)

    # ------------------------------------------------------------------------------ internals
    def _set_size(self, key: tuple[str, str], size: int) -> None:
        self._bytes += size - self._sizes.get(key, 0)
        self._sizes[key] = size

    def _evict(self) -> None:
        while self._records and (len(self._records) > self.max_records or self._bytes > self.max_bytes):
            oldest = next(iter(self._records))
            self._forget(oldest)

    def _forget(self, key: tuple[str, str]) -> None:
        self._records.pop(key, None)
        self._bytes -= self._sizes.pop(key, 0)
        if self.directory is not None:
            self._remove_files(*key)

    def _remove_files(self, tenant: str, response_id: str) -> None:
        folder = self.folder(tenant)
        if folder is None:
            return
        for suffix in (RECORD_SUFFIX, STATE_SUFFIX):
            try:
                (folder / f"{response_id}{suffix}").unlink(missing_ok=True)
            except OSError:
                logger.warning("could not delete %s", folder / f"{response_id}{suffix}")

    @staticmethod
    def _state_bytes(folder: Path, response_id: str) -> int:
        path = folder / f"{response_id}{STATE_SUFFIX}"
        return path.stat().st_size if path.is_file() else 0

    def _write(self, record: StoredResponse, folder: Path) -> None:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(record)}
        fd, tmp = tempfile.mkstemp(prefix=f".{record.id}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, ensure_ascii=False)
            os.replace(tmp, folder / f"{record.id}{RECORD_SUFFIX}")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read(self, tenant: str, response_id: str) -> StoredResponse | None:
        folder = self.folder(tenant)
        path = (folder or Path()) / f"{response_id}{RECORD_SUFFIX}"
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            if body.get("format") != FORMAT or body.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unsupported format {body.get('format_version')!r}")
            fields = {k: body[k] for k in ("id", "tenant", "response", "history_ids", "messages", "reply",
                                           "instructions", "template_tools", "state_saved")}
            return StoredResponse(**fields, nbytes=int(body.get("nbytes", 0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("stored response %s is unreadable (%s); forgetting it", path, exc)
            return None

    def _index_disk(self, directory: Path) -> None:
        """Know the records a previous run wrote (oldest first), without reading them yet."""
        found = []
        for path in directory.glob(f"**/resp_*{RECORD_SUFFIX}"):
            response_id = path.name.removesuffix(RECORD_SUFFIX)
            if not valid_id(response_id):
                continue
            tenant = "" if path.parent == directory else path.parent.name
            size = path.stat().st_size + self._state_bytes(path.parent, response_id)
            found.append((path.stat().st_mtime, (tenant, response_id), size))
        for _, key, size in sorted(found):
            self._records[key] = None
            self._set_size(key, size)
        self._evict()
