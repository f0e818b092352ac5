"""The Ray Serve application: a front deployment (the HTTP ingress) over the engine deployment.

`build_application(settings, options)` is what `megalodon-serve-cluster` runs; `build(args)` is
the same for Serve config files (`serve run` / `serve deploy`, `import_path:
megalodon_cluster.app:build`), whose `args` are any `ServerSettings` fields (the `megalodon-serve`
options) plus the `ClusterOptions` fields. The replicas get the settings as resolved here, so a
node's own `MEGALODON_*` environment cannot make one replica differ from the others.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from megalodon_cluster.front import Front
from megalodon_cluster.replica import EngineReplica
from megalodon_cluster.router import SessionAffineRouter
from megalodon_cluster.routing import DEFAULT_BALANCE
from server.settings import ServerSettings

ENGINE_DEPLOYMENT = "megalodon-engine"
FRONT_DEPLOYMENT = "megalodon-front"
APP_NAME = "megalodon"


class ClusterOptions(BaseModel):
    """How the app is spread over the Ray cluster (`megalodon-serve-cluster` flags, config-file args)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int = Field(1, ge=1, description="Engine replicas: each loads the model and runs one engine.")
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per engine replica (also its torch "
                                "threads unless --torch-threads is given).")
    replica_gpus: float | None = Field(None, ge=0, description="GPUs per engine replica. Unset: 1 when --device "
                                       "is a CUDA device, else 0.")
    front_replicas: int = Field(1, ge=1, description="Replicas of the front (the HTTP ingress that picks each "
                                "request's conversation key); it holds no model.")
    balance: float = Field(DEFAULT_BALANCE, ge=1.0, description="Load bound of session-affine routing: a replica "
                           "takes a conversation while its requests in flight stay under balance x the mean.")
    retries: int = Field(3, ge=0, description="Times a request is sent again when its replica died before "
                         "answering.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between Ray Serve's replica health "
                                         "checks (a replica whose engine stopped is replaced).")

    def gpus(self, settings: ServerSettings) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return 1.0 if settings.device.startswith("cuda") else 0.0


def replica_settings(settings: ServerSettings, options: ClusterOptions) -> dict[str, Any]:
    """The settings every replica is built from, as plain values (they travel pickled)."""
    values = settings.model_dump(mode="json")
    if values["torch_threads"] is None:
        # NOTE: Ray has reserved replica_cpus for this replica; the single-server rule (one less
        # than the machine's CPUs) would let every replica on a node claim all of them.
        values["torch_threads"] = max(1, int(options.replica_cpus))
    return values


def build_application(settings: ServerSettings, options: ClusterOptions) -> Application:
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.gpus(settings)},
        # The engine queues and refuses (429) by itself; Serve only must not refuse earlier.
        max_ongoing_requests=settings.max_num_seqs + settings.max_waiting_requests,
        request_router_config=RequestRouterConfig(request_router_class=SessionAffineRouter,
                                                  request_router_kwargs={"balance": options.balance}),
        health_check_period_s=options.health_check_period_s,
        graceful_shutdown_timeout_s=settings.drain_timeout + 10,
    )
    front = serve.deployment(Front, name=FRONT_DEPLOYMENT, num_replicas=options.front_replicas,
                             ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    return front.bind(engine.bind(replica_settings(settings, options)), settings.max_request_bytes, options.retries)


def build(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files: `args` mixes ServerSettings and ClusterOptions fields."""
    cluster = {k: v for k, v in args.items() if k in ClusterOptions.model_fields}
    server = {k: v for k, v in args.items() if k not in ClusterOptions.model_fields}
    return build_application(ServerSettings(**server), ClusterOptions(**cluster))
