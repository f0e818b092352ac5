"""The engine deployment: one `megalodon-serve` app (one engine, one model copy) per Ray Serve replica.

A replica builds the app from the cluster's `ServerSettings`, runs its lifespan and becomes ready
only once the model is loaded (Ray Serve routes nothing to a replica whose constructor has not
returned, so no request meets the loading 503). It answers the front's forwarded requests as a
stream: first `(status, headers)`, then the body's pieces as the app sends them (tokens of a
stream pass through one by one). `check_health` fails once the engine has stopped, and Ray
replaces the replica. On shutdown in-flight requests drain, the engine stops and the state store
writes what it has queued. Every response names the replica in `x-megalodon-replica`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from megalodon_cluster.asgi_bridge import ForwardedRequest, Lifespan, call_app
from megalodon_cluster.metrics_bridge import MetricsBridge
from server.app import build_app
from server.settings import ServerSettings

logger = logging.getLogger("megalodon.cluster")

REPLICA_HEADER = "x-megalodon-replica"
METRICS_SYNC_S = 2.0  # Ray's agents export every few seconds; copying faster buys nothing
# The longest a response's end waits for the state store's queued writes (a slow shared volume).
STORE_WAIT_S = 5.0


class EngineReplica:
    """The deployment's class (`megalodon_cluster.app` sets its resources and router)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServerSettings(**settings)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.app = build_app(self.settings)
        self.state = self.app.state.megalodon
        self.lifespan = Lifespan(self.app)
        await self.lifespan.startup()
        while self.state.engine is None and self.state.load_error is None:
            await asyncio.sleep(0.05)
        if self.state.load_error is not None:
            raise RuntimeError(f"the model failed to load: {self.state.load_error}")
        self.bridge = MetricsBridge(self.state.metrics.registry, self.replica_id)
        self._bridge_task = asyncio.get_running_loop().create_task(self._sync_metrics())
        logger.info("replica %s serves %s", self.replica_id, self.settings.model_name)

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[Any]:
        """The app's answer to `request`: `(status, headers)` first, then body pieces (bytes).

        NOTE: the last piece waits until the state store has written what was queued before it (this
        request's final state among them): a client that has the whole answer can send the next turn
        to any replica, and that replica finds the state.
        """
        async for message in call_app(self.app, request):
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield message["status"], [*headers, (REPLICA_HEADER, self.replica_id)]
            elif message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await self._stored()
                if message.get("body"):
                    yield message["body"]

    async def _stored(self) -> None:
        engine = self.state.engine
        store = engine.engine.state_store if engine is not None else None
        if store is not None and not await asyncio.to_thread(store.flush, STORE_WAIT_S):
            logger.warning("the state store did not write within %.0f s; answering anyway", STORE_WAIT_S)

    def check_health(self) -> None:
        """Raise (Ray then restarts this replica) once the engine thread is gone."""
        engine = self.state.engine
        if engine is None or not engine.is_running:
            raise RuntimeError(f"replica {self.replica_id}: the engine is not running")

    async def _sync_metrics(self) -> None:
        while True:
            try:
                self.bridge.sync()
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                logger.exception("copying metrics to Ray failed")
            await asyncio.sleep(METRICS_SYNC_S)

    async def __del__(self) -> None:
        self._bridge_task.cancel()
        with contextlib.suppress(Exception):
            self.bridge.sync()  # the last counts
        await self.state.drain(self.settings.drain_timeout)
        await self.lifespan.shutdown()
