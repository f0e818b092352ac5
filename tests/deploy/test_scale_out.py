"""docker/docker-compose.replicas.yml and docker/caddy/Caddyfile: replicas of the GPU service, one GPU
each, behind Caddy; replayed outside Docker with the real Caddy binary in front of two real servers."""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._docker import (
    CADDYFILE,
    COMPOSE_FILE,
    GPU_DOCKERFILE,
    REPLICAS_FILE,
    caddy_binary,
    compose_config,
    parse_dockerfile,
    run_compose,
)
from ._server import ServerProcess, complete, container_spec, free_port

REPLICAS = ("megalodon-0", "megalodon-1")
FILES = (COMPOSE_FILE, REPLICAS_FILE)


@pytest.fixture(scope="module")
def replicas_compose(compose_bin, empty_env_file) -> dict:
    return compose_config(compose_bin, empty_env_file, compose_files=FILES, profiles=("replicas",))


def caddy(binary: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # Caddy keeps its state under $HOME / XDG folders: a scratch folder keeps the user's untouched.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_DATA_HOME": str(home),
           "XDG_CONFIG_HOME": str(home)}
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=60)


def upstreams(caddyfile: str) -> list[str]:
    (line,) = re.findall(r"^\s*reverse_proxy (.+) \{$", caddyfile, flags=re.M)
    return line.split()


def test_replicas_file_validates(compose_bin, empty_env_file):
    result = run_compose(compose_bin, "config", "--quiet", env_file=empty_env_file, compose_files=FILES,
                         profiles=("replicas",))
    assert result.returncode == 0 and "variable is not set" not in result.stderr, result.stderr


def test_each_replica_is_the_gpu_service_on_its_own_gpu(compose, replicas_compose):
    services = replicas_compose["services"]
    assert set(services) == {"prometheus", "grafana", "lb", *REPLICAS}, "only the replicas profile runs"
    base = compose["services"]["megalodon"]
    gpus = []
    for name in REPLICAS:
        replica = services[name]
        for key in ("environment", "volumes", "secrets", "healthcheck", "build", "image", "networks"):
            assert replica[key] == base[key], f"{name}.{key} differs from the megalodon service"
        assert not replica.get("ports"), "replicas are reached through the load balancer only"
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and len(device["device_ids"]) == 1
        gpus += device["device_ids"]
    assert len(set(gpus)) == len(REPLICAS), f"replicas share a GPU: {gpus}"


def test_caddy_balances_exactly_the_replicas(replicas_compose):
    text = CADDYFILE.read_text()
    port = parse_dockerfile(GPU_DOCKERFILE)[-1].env["MEGALODON_PORT"]
    assert upstreams(text) == [f"{name}:{port}" for name in REPLICAS]
    (lb_port,) = replicas_compose["services"]["lb"]["ports"]
    assert re.search(rf"^:{lb_port['target']} \{{$", text, flags=re.M), "Caddy listens on the lb's container port"
    mounted = {Path(v["source"]) for v in replicas_compose["services"]["lb"]["volumes"]}
    assert CADDYFILE in mounted


def test_caddyfile_validates_and_a_broken_one_does_not(tmp_path):
    binary = caddy_binary()
    good = caddy(binary, "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile", home=tmp_path)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "Caddyfile"
    broken.write_text(CADDYFILE.read_text().replace("least_conn", "least_connections"))
    bad = caddy(binary, "validate", "--config", str(broken), "--adapter", "caddyfile", home=tmp_path)
    assert bad.returncode != 0


def finished_requests(base_url: str) -> float:
    families = text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text)
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == "megalodon:request_success_total")


@pytest.mark.slow
def test_two_replicas_behind_caddy_share_the_load(replicas_compose, demo_model, tmp_path):
    key = "sk-test-shared-by-both-replicas"
    servers = []
    for name in REPLICAS:
        workdir = tmp_path / name
        workdir.mkdir()
        spec = container_spec(GPU_DOCKERFILE, replicas_compose["services"][name], workdir, models_dir=demo_model,
                              secret_value=key)
        servers.append(ServerProcess(spec.argv, spec.env, workdir / "server.log"))
    lb_port = free_port()
    # The only edits: replica addresses, and a plain-HTTP listener bound to loopback instead of every
    # interface of a container (a site address with a host would otherwise make Caddy serve HTTPS).
    caddyfile = re.sub(r"^:8000 \{$", f"http://127.0.0.1:{lb_port} {{\n\tbind 127.0.0.1", CADDYFILE.read_text(),
                       flags=re.M)
    for name, server in zip(REPLICAS, servers, strict=True):
        caddyfile = caddyfile.replace(f"{name}:8000", server.base_url.removeprefix("http://"))
    (tmp_path / "Caddyfile").write_text(caddyfile)
    lb_url = f"http://127.0.0.1:{lb_port}"
    proxy = None
    try:
        for server in servers:
            server.start()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path),
               "XDG_CONFIG_HOME": str(tmp_path)}
        with open(tmp_path / "caddy.log", "wb") as log:
            proxy = subprocess.Popen([str(caddy_binary()), "run", "--config", str(tmp_path / "Caddyfile"),
                                      "--adapter", "caddyfile"], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: httpx.get(lb_url + "/health", timeout=2).status_code == 200, proxy)

        assert httpx.get(lb_url + "/v1/models", timeout=30).status_code == 401, "each replica checks the key"
        # Overlapping requests: least_conn sends the second to the replica that is not busy.
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda i: complete(lb_url, key, stream=i % 2 == 1), range(4)))
        assert all(body["choices"][0]["finish_reason"] in ("stop", "length") for body in bodies)
        served = [finished_requests(server.base_url) for server in servers]
        assert sum(served) == 4 and min(served) >= 1, f"requests per replica: {served}"
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        statuses = [server.stop() for server in servers]
    assert statuses == [0, 0]


def wait_for(ready, proxy: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proxy.poll() is None, f"caddy exited with {proxy.returncode}"
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("the load balancer did not answer /health")
