"""Prometheus and Grafana config: every metric they name is one server/metrics.py declares, the
dashboard shows what an operator needs, and the files point at each other correctly.

tests/deploy/test_live_metrics.py repeats the metric check against a running server's /metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.metrics import Metrics
from tests.deploy._configs import (
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    PROMETHEUS,
    config_problems,
    dashboard,
    load_yaml,
)
from tests.deploy._docker import DOCKER_DIR
from tests.deploy._promql import Exposition, dashboard_queries, references

# What the issue asks the dashboard to show, as the series that carry it.
REQUIRED_SERIES = {
    "TTFT percentiles": "megalodon:time_to_first_token_seconds_bucket",
    "inter-token latency percentiles": "megalodon:inter_token_latency_seconds_bucket",
    "tokens/s": "megalodon:generation_tokens_total",
    "running requests": "megalodon:num_requests_running",
    "waiting requests": "megalodon:num_requests_waiting",
    "state-slot usage": "megalodon:state_slot_usage_perc",
    "prefix-cache hits": "megalodon:prefix_cache_hits_total",
    "prefix-cache queries": "megalodon:prefix_cache_queries_total",
    "errors by type": "megalodon:request_success_total",
    "client disconnects": "megalodon:http_requests_client_disconnected_total",
}


def test_every_metric_the_configs_name_is_declared_in_server_metrics():
    exposition = Exposition.parse(Metrics("megalodon-test", max_model_len=32768).render().decode())
    assert not config_problems(exposition), "\n".join(config_problems(exposition))


def test_the_check_reports_unknown_metrics_labels_and_values():
    """The cross-check can fail: a misspelt metric, an absent label and an impossible value."""
    exposition = Exposition.parse(Metrics("m", max_model_len=1024).render().decode())
    expr = ('sum by (finished_reason) (rate(megalodon:request_success_total{finished_reason=~"error|oops"}[5m]))'
            ' / sum(megalodon:num_requests_runing) + sum(megalodon:num_requests_waiting{slot="1"})')
    assert exposition.problems(expr, {"megalodon"}) == [
        "megalodon:request_success_total{finished_reason} never has the value 'oops'",
        "metric 'megalodon:num_requests_runing' is not exposed",
        "megalodon:num_requests_waiting has no label 'slot'",
    ]
    refs = references('histogram_quantile(0.9, sum by (le) (rate(x_bucket{a="b"}[$__rate_interval])))')
    assert [(s.metric, s.matchers) for s in refs.selectors] == [("x_bucket", [("a", "=", "b")])]
    assert refs.grouping_labels == {"le"}


def test_dashboard_shows_what_the_issue_asks_for():
    named = {s.metric for expr in dashboard_queries(dashboard()) for s in references(expr).selectors}
    missing = {what: series for what, series in REQUIRED_SERIES.items() if series not in named}
    assert not missing
    errors = [e for e in dashboard_queries(dashboard()) if 'finished_reason=~"error|abort"' in e]
    assert errors, "errors by type: finished_reason error and abort"
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        quantiles = {float(q) for e in dashboard_queries(dashboard())
                     for q in re.findall(rf"histogram_quantile\(([\d.]+), .*megalodon:{histogram}_bucket", e)}
        assert {0.5, 0.9, 0.99} <= quantiles, histogram


def test_dashboard_is_well_formed():
    board = dashboard()
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs) and all(t["datasource"]["uid"] == uid for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
    assert all(v["datasource"]["uid"] == uid for v in board["templating"]["list"])


def test_grafana_provisioning_matches_the_compose_mounts(compose):
    grafana = compose["services"]["grafana"]
    mounts = {Path(v["source"]): v["target"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts[DOCKER_DIR / "grafana" / "provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert mounts[DASHBOARD.parent] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    (prometheus_port,) = compose["services"]["prometheus"]["ports"]
    assert datasource["url"] == f"http://prometheus:{prometheus_port['target']}"


@pytest.mark.parametrize("service", ["megalodon", "megalodon-cpu"])
def test_prometheus_discovers_every_server_replica(compose, service):
    (job,) = [j for j in load_yaml(PROMETHEUS)["scrape_configs"] if j["job_name"] == "megalodon"]
    (discovery,) = job["dns_sd_configs"]
    server = compose["services"][service]
    assert discovery["names"] == server["networks"]["default"]["aliases"]
    assert discovery["port"] == server["ports"][0]["target"]
    assert job["metrics_path"] == "/metrics"
    mounted = {Path(v["source"]) for v in compose["services"]["prometheus"]["volumes"] if v["type"] == "bind"}
    assert PROMETHEUS in mounted
