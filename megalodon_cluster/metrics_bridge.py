"""Every replica's Prometheus metrics, exported through Ray's metrics pipeline.

A replica has no port of its own for Prometheus to scrape; Ray exports application metrics
(`ray.util.metrics`) from every node's metrics agent, which Prometheus already scrapes on a Ray
cluster (and KubeRay's PodMonitor). The bridge copies the replica's `megalodon:` and `vllm:`
families there every few seconds, tagged with the replica's id: gauges as gauges, counters by
their increments, histograms with the same bucket bounds, so Ray exports `ray_megalodon_...` and
`ray_vllm_...` series with the meanings and buckets of the server's own `/metrics`.

NOTE: a histogram is copied from its bucket counts and sum, which is all Prometheus keeps of it:
each new observation is re-observed at a value inside its bucket, the values chosen so the sum
moves exactly as the original's did (`histogram_observations`), so every bucket, _count and _sum
series agrees with the replica's own registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

PREFIXES = ("megalodon:", "vllm:")
REPLICA_TAG = "replica"


def ray_name(name: str) -> str:
    """Ray refuses ':' in metric names: `megalodon:ttft` -> `megalodon_ttft` (exported as `ray_megalodon_ttft`)."""
    return name.replace(":", "_")


def histogram_observations(bounds: Sequence[float], counts: Sequence[int], total: float) -> list[tuple[float, int]]:
    """(value, times) pairs that put counts[i] observations in bucket i and add up to `total`.

    `bounds` are the finite upper bounds b0 < b1 < ...; `counts` has one more entry, for the +Inf
    bucket. Bucket i is (b[i-1], b[i]] (the first starts at 0: these metrics are never negative).
    Finite buckets get one shared position t in (0, 1] of their width, solved from `total`; with
    +Inf observations those take the finite buckets' midpoints and share the remainder.
    """
    lows = [0.0, *bounds[:-1]]
    finite = [(low, high, k) for low, high, k in zip(lows, bounds, counts[:-1], strict=True) if k]
    k_inf = counts[-1]

    def inside(low: float, value: float) -> float:
        return max(value, math.nextafter(low, math.inf)) if low > 0 else value

    if k_inf:
        placed = [(inside(low, (low + high) / 2), k) for low, high, k in finite]
        rest = (total - sum(v * k for v, k in placed)) / k_inf
        return [*placed, (max(rest, math.nextafter(bounds[-1], math.inf)), k_inf)]
    base = sum(low * k for low, _, k in finite)
    width = sum((high - low) * k for low, high, k in finite)
    t = min(1.0, max(0.0, (total - base) / width)) if width else 1.0
    return [(inside(low, low + t * (high - low)), k) for low, high, k in finite]


class MetricsBridge:
    """Copies one registry's families into Ray metrics; call `sync()` periodically (any thread).

    `factory(kind, name, description, tag_keys, boundaries)` builds a Ray metric; the default uses
    `ray.util.metrics` (tests pass their own).
    """

    def __init__(self, registry: CollectorRegistry, replica: str,
                 factory: Callable[..., Any] | None = None) -> None:
        self.registry = registry
        self.replica = replica
        self._factory = factory or _ray_metric
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # counter/histogram totals seen

    def sync(self) -> None:
        for family in self.registry.collect():
            if not family.name.startswith(PREFIXES):
                continue
            if family.type == "gauge":
                for sample in family.samples:
                    self._metric("gauge", family, sample.labels).set(sample.value, self._tags(sample.labels))
            elif family.type == "counter":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        self._count(family, sample.labels, sample.value)
            elif family.type == "histogram":
                self._sync_histogram(family)

    def _tags(self, labels: dict[str, str]) -> dict[str, str]:
        return {**{k: v for k, v in labels.items() if k != "le"}, REPLICA_TAG: self.replica}

    def _metric(self, kind: str, family: Any, labels: dict[str, str], boundaries: list[float] | None = None) -> Any:
        metric = self._metrics.get(family.name)
        if metric is None:
            keys = tuple(sorted(self._tags(labels)))
            metric = self._factory(kind, ray_name(family.name), family.documentation, keys, boundaries)
            self._metrics[family.name] = metric
        return metric

    def _delta(self, name: str, labels: dict[str, str], value: float) -> float:
        key = (name, tuple(sorted(labels.items())))
        delta = value - self._last.get(key, 0.0)
        self._last[key] = value
        return delta

    def _count(self, family: Any, labels: dict[str, str], value: float) -> None:
        delta = self._delta(family.name, labels, value)
        if delta > 0:
            self._metric("counter", family, labels).inc(delta, self._tags(labels))

    def _sync_histogram(self, family: Any) -> None:
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            entry = series.setdefault(tuple(sorted(labels.items())), {"labels": labels, "buckets": {}, "sum": 0.0})
            if sample.name.endswith("_bucket"):
                entry["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
        for entry in series.values():
            labels, cumulative = entry["labels"], sorted(entry["buckets"].items())
            bounds = [le for le, _ in cumulative if le != math.inf]
            counts = _per_bucket(self._delta(family.name + "_bucket" + str(le), labels, c) for le, c in cumulative)
            if not any(counts):
                continue
            total = self._delta(family.name + "_sum", labels, entry["sum"])
            metric = self._metric("histogram", family, labels, bounds)
            for value, times in histogram_observations(bounds, counts, total):
                for _ in range(times):
                    metric.observe(value, self._tags(labels))


def _per_bucket(cumulative_deltas: Iterable[float]) -> list[int]:
    counts, previous = [], 0.0
    for value in cumulative_deltas:
        counts.append(int(round(value - previous)))
        previous = value
    return counts


def _ray_metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...],
                boundaries: list[float] | None) -> Any:
    from ray.util import metrics

    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=tag_keys)
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tag_keys)
    return metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys)
