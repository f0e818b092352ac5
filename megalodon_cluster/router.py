"""The engine deployment's Ray Serve request router: session-affine with bounded load, else least loaded.

Plugs into `ray.serve.request_router.RequestRouter` (Ray Serve's public router API). A request the
front tagged with a conversation key (`DeploymentHandle.options(session_id=...)`) is offered to the
replicas in the order `routing.bounded_choice` gives for that key: the replica its last request went
to (which holds its state), else its ring owner, unless that one is over the load bound, then the
next ones clockwise, each tried in turn by Serve's routing
loop (which also skips replicas whose queues are full). A request without a key is offered to every
replica at once (shuffled), and Serve's loop picks the one with the fewest requests in flight. Loads are the
router's queue-length cache: bumped on every send, lowered on every completion, refreshed by Serve's
probes of each replica.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from megalodon_cluster.routing import (
    DEFAULT_BALANCE,
    DEFAULT_VIRTUAL_NODES,
    HashRing,
    Placements,
    affine_order,
    bounded_choice,
)


class SessionAffineRouter(RequestRouter):
    """Keyword arguments (`request_router_kwargs`): `balance` (>= 1; the load bound's factor over the
    mean, default 1.25) and `virtual_nodes` (points per replica on the ring, default 100)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._balance = DEFAULT_BALANCE
        self._virtual_nodes = DEFAULT_VIRTUAL_NODES
        self._ring = HashRing(())
        self._placements = Placements()
        super().__init__(*args, **kwargs)

    def initialize_state(self, balance: float = DEFAULT_BALANCE, virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
                         **kwargs: object) -> None:
        if kwargs:
            raise ValueError(f"unknown SessionAffineRouter arguments: {sorted(kwargs)}")
        if balance < 1:
            raise ValueError(f"balance must be at least 1, got {balance}")
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        self._balance = balance
        self._virtual_nodes = virtual_nodes
        self._ring = HashRing(self._ring.members, virtual_nodes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        members = {replica.replica_id.unique_id for replica in replicas}
        if members != self._ring.members:
            # NOTE: only the keys of a replica that left (or the share a new one takes) move; their
            # next turns find their states in the shared state store.
            self._ring = HashRing(members, self._virtual_nodes)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key or not candidate_replicas:
            # Least loaded: Serve's loop takes the shortest queue, the first of equals, so shuffled
            # (idle replicas share sequential requests instead of the first one taking them all).
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        # Walk the ranks with backoff between rounds rather than spinning when all are full.
        pending_request.routing_context.should_backoff = True
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        order = [member for member in self._ring.order(key) if member in by_id]
        order += [member for member in by_id if member not in order]  # not on the ring yet
        order = affine_order(order, self._placements.holder(key))
        loads = {member: self._load(by_id[member].replica_id) for member in order}
        return [[by_id[member]] for member in bounded_choice(order, loads, self._balance)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        key = pending_request.metadata.session_id
        if key:
            self._placements.record(key, replica_id.unique_id)

    def _load(self, replica_id: ReplicaID) -> int:
        return self.replica_queue_len_cache.get(replica_id) or 0
