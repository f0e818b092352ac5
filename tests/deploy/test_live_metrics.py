"""Every metric, label and label value the Grafana dashboard and prometheus.yml use is in a running
server's /metrics, scraped the way Prometheus does (no credentials) from the compose CPU service."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.deploy._configs import config_problems
from tests.deploy._docker import CPU_DOCKERFILE
from tests.deploy._promql import Exposition
from tests.deploy._server import complete, container_spec
from tests.harness import ServerProcess


@pytest.fixture(scope="module")
def served(compose, demo_model, tmp_path_factory) -> Iterator[tuple[ServerProcess, str]]:
    workdir = tmp_path_factory.mktemp("live_metrics")
    spec = container_spec(CPU_DOCKERFILE, compose["services"]["megalodon-cpu"], workdir, models_dir=demo_model)
    server = ServerProcess.from_command(spec.argv, spec.env, workdir / "server.log")
    try:
        server.wait_healthy()
        yield server, spec.api_key
    finally:
        server.terminate()


@pytest.mark.slow
def test_dashboard_and_prometheus_metrics_exist_in_live_metrics(served):
    server, api_key = served
    # Traffic first, so per-request histograms and finish reasons have been written at least once.
    complete(server.base_url, api_key)
    complete(server.base_url, api_key, prompt="import os\n", stream=True)
    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200, "Prometheus scrapes /metrics without an API key"
    exposition = Exposition.parse(response.text)
    problems = config_problems(exposition)
    assert not problems, "\n".join(problems)
    finished = exposition.labels["megalodon:request_success_total"]["finished_reason"]
    assert {"stop", "length", "abort", "error"} <= finished
