"""The engine's side of the shared state store: what it writes when a request ends, and the lookups
it makes for new requests before they are scheduled.

`LLMEngine` owns one `SharedStates` when `state_store_dir` is set. Lookups run on the engine thread
between steps with the engine lock released (they read files); only putting a found state into the
prefix cache takes the lock. A state found there is then an ordinary prefix-cache hit at admission.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from megalodon_infer.core.prefix_cache import PrefixCache
from megalodon_infer.core.state_pool import StatePool
from megalodon_infer.core.state_store import DirectoryStateStore
from megalodon_infer.engine.request import Request

logger = logging.getLogger(__name__)


class SharedStates:
    def __init__(self, store: DirectoryStateStore, cache: PrefixCache, pool: StatePool, device: torch.device,
                 lock: threading.RLock) -> None:
        self.store = store
        self.cache = cache
        self.pool = pool
        self.device = device
        self.lock = lock
        self._unchecked: list[Request] = []  # added, not yet looked up (guarded by `lock`)

    def added(self, request: Request) -> None:
        """Under the engine lock: `request` was queued; look it up before it is admitted."""
        if request.prompt_logprobs is None:  # those bypass the prefix cache altogether
            self._unchecked.append(request)

    def take_unchecked(self) -> list[Request]:
        """Under the engine lock: the requests to look up now (none: scheduling may proceed)."""
        unchecked, self._unchecked = self._unchecked, []
        return unchecked

    def fetch(self, requests: list[Request], is_live: Callable[[str], bool]) -> None:
        """Engine lock released: for each request, put the store's longest prefix of its prompt into the
        prefix cache when it is longer than what the cache holds.

        NOTE: decoding pauses for these reads, but they are rare where conversations are routed to the
        replica that holds them (only after a move or a failure), and reading a state takes
        milliseconds where re-prefilling its history takes a pass over every token.
        """
        for request in requests:
            with self.lock:
                if not is_live(request.request_id):
                    continue  # aborted meanwhile
                held = self.cache.stored_length(request.prompt_ids, request.cache_namespace)
            if held >= len(request.prompt_ids):
                continue
            try:
                session = self.store.fetch(request.cache_namespace, request.prompt_ids, longer_than=held)
            except Exception:  # noqa: BLE001 - the request is then prefilled as if nothing was stored
                logger.exception("state store lookup failed")
                continue
            if session is None:
                continue
            mismatch = self.pool.snapshot_mismatch(session.snapshot)
            if mismatch is not None:
                logger.warning("stored state for %s does not fit this model (%s)", request.request_id, mismatch)
                continue
            snapshot = session.snapshot.to(self.device)
            with self.lock:
                self.cache.insert_final(session.token_ids, snapshot, session.last_logits,
                                        namespace=request.cache_namespace)
            logger.info("request %s: resumed %d of %d prompt tokens from the state store", request.request_id,
                        len(session.token_ids), len(request.prompt_ids))
