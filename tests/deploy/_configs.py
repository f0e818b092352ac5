"""The monitoring files in docker/ and the check of the metrics they name against a /metrics page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.deploy._docker import DOCKER_DIR
from tests.deploy._promql import Exposition, dashboard_queries

DASHBOARD = DOCKER_DIR / "grafana" / "dashboards" / "megalodon.json"
DATASOURCES = DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER_DIR / "grafana" / "provisioning" / "dashboards" / "megalodon.yml"
PROMETHEUS = DOCKER_DIR / "prometheus" / "prometheus.yml"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def prometheus_jobs() -> set[str]:
    return {job["job_name"] for job in load_yaml(PROMETHEUS)["scrape_configs"]}


def prometheus_metric_names() -> set[str]:
    """megalodon:* names anywhere in prometheus.yml (relabel rules, if any are added)."""
    return set(re.findall(r"megalodon:[A-Za-z0-9_:]+", PROMETHEUS.read_text()))


def config_problems(exposition: Exposition) -> list[str]:
    """Everything the dashboard or prometheus.yml names that `exposition` lacks."""
    problems = []
    for expr in dashboard_queries(dashboard()):
        problems += [f"{p}   <- {expr}" for p in exposition.problems(expr, prometheus_jobs())]
    problems += [f"prometheus.yml: {name} is not exposed" for name in sorted(prometheus_metric_names())
                 if name not in exposition.labels]
    return problems
