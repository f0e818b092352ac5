"""`megalodon-serve-cluster`: `megalodon-serve` on Ray Serve, N engine replicas behind one address.

Takes every `megalodon-serve` flag (and `MEGALODON_*` variable), plus the `ClusterOptions` flags
and how to reach Ray: `--ray-address ADDR` joins a running cluster (`auto`: the one on this
machine), none starts a local one (`--num-cpus`, `--num-gpus` size it). Serve's HTTP proxy listens
on --host/--port. SIGTERM or Ctrl-C deletes the application (replicas drain, engines stop, the
state store writes what it holds) and, for a local cluster, stops Ray. Bad flags exit 2; a
missing model exits 1 before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from megalodon_cluster.app import APP_NAME, ClusterOptions
from server.cli import EXIT_LOAD_FAILED
from server.cli import build_parser as server_parser
from server.settings import ENV_PREFIX, ServerSettings

logger = logging.getLogger("megalodon.cluster")

_CLUSTER = "cluster."  # namespace prefix of ClusterOptions flags
_LAUNCH = ("ray_address", "num_cpus", "num_gpus", "metrics_export_port")


def build_parser() -> argparse.ArgumentParser:
    parser = server_parser()
    parser.prog = "megalodon-serve-cluster"
    parser.description = ("megalodon-serve on Ray Serve: session-affine engine replicas sharing a state store. "
                          f"Takes every megalodon-serve flag ({ENV_PREFIX}* variables too) and these:")
    group = parser.add_argument_group("cluster")
    for name, field in ClusterOptions.model_fields.items():
        group.add_argument("--" + name.replace("_", "-"), dest=_CLUSTER + name, metavar=name.upper(),
                           default=argparse.SUPPRESS, help=f"{field.description} (default: {field.default})")
    group.add_argument("--ray-address", default=None, help="Join this Ray cluster ('auto': the one running "
                       "here). Unset: start a local cluster for this process.")
    group.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all).")
    group.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local cluster (default: all).")
    group.add_argument("--metrics-export-port", type=int, default=None, help="Port of the local cluster's "
                       "Prometheus metrics export (every replica's metrics; default: Ray's choice).")
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[ServerSettings, ClusterOptions, dict[str, Any]]:
    parser = build_parser()
    values: dict[str, Any] = vars(parser.parse_args(argv))
    launch = {name: values.pop(name) for name in _LAUNCH}
    cluster = {k.removeprefix(_CLUSTER): values.pop(k) for k in list(values) if k.startswith(_CLUSTER)}
    return _validated(parser, ServerSettings, values), _validated(parser, ClusterOptions, cluster), launch


def _validated(parser: argparse.ArgumentParser, model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model(**values)
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()))


def main(argv: Sequence[str] | None = None) -> int:
    settings, options, launch = parse(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    if not (settings.model / "config.json").is_file():
        print(f"megalodon-serve-cluster: no model at {settings.model} (config.json missing)", file=sys.stderr)
        return EXIT_LOAD_FAILED
    # NOTE: imported only now, so --help and bad flags answer without starting Ray.
    import ray
    from ray import serve

    from megalodon_cluster.app import build_application

    local = launch["ray_address"] is None
    if local:
        # NOTE: a cluster of this process alone: its services listen on loopback only (a cluster
        # other machines join is started with `ray start --head` and joined with --ray-address).
        extra = {"_node_ip_address": "127.0.0.1", "_metrics_export_port": launch["metrics_export_port"]}
        ray.init(num_cpus=launch["num_cpus"], num_gpus=launch["num_gpus"], include_dashboard=False, **extra)
    else:
        ray.init(address=launch["ray_address"])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/", blocking=False)
        logger.info("serving %s on http://%s:%d with %d replicas", settings.model_name, settings.host, settings.port,
                    options.replicas)
        print(f"megalodon-serve-cluster: ready on http://{settings.host}:{settings.port} "
              f"(Ray at {ray.get_runtime_context().gcs_address})", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)  # drains the replicas; a joined cluster keeps its other applications
        if local:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
