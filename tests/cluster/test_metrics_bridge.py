"""The copy of a replica's registry into Ray's metrics: gauges, counter increments, and histograms
whose every bucket, count and sum agree with the original."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest

from megalodon_cluster.metrics_bridge import MetricsBridge, histogram_observations, ray_name
from server.metrics import INTER_TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS, Metrics


class FakeRayMetric:
    """Records what the bridge hands to Ray, keyed by tag set."""

    def __init__(self, kind, name, description, tag_keys, boundaries):
        self.kind, self.name, self.tag_keys, self.boundaries = kind, name, tag_keys, boundaries
        self.values: dict = {}
        self.observed: dict = defaultdict(list)

    def _key(self, tags):
        assert set(tags) == set(self.tag_keys), (tags, self.tag_keys)
        return tuple(sorted(tags.items()))

    def set(self, value, tags):
        self.values[self._key(tags)] = value

    def inc(self, value, tags):
        assert value > 0
        self.values[self._key(tags)] = self.values.get(self._key(tags), 0) + value

    def observe(self, value, tags):
        self.observed[self._key(tags)].append(value)


def bucket_counts(bounds, values):
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
    return counts


@pytest.mark.parametrize("seed", range(5))
def test_reconstructed_observations_keep_every_bucket_and_the_sum(seed):
    rng = random.Random(seed)
    bounds = list(TTFT_BUCKETS)
    values = [rng.expovariate(rng.choice([0.05, 1, 20])) for _ in range(rng.randint(1, 300))]
    if seed % 2:
        values += [bounds[-1] * 3, bounds[0]]  # one past the last bound, one exactly on the first
    counts = bucket_counts(bounds, values)
    pairs = histogram_observations(bounds, counts, sum(values))
    replayed = [value for value, times in pairs for _ in range(times)]
    assert bucket_counts(bounds, replayed) == counts
    assert math.isclose(sum(replayed), sum(values), rel_tol=1e-9)


def test_the_bridge_copies_gauges_counter_increments_and_histograms():
    metrics = Metrics("demo", max_model_len=4096)
    made: dict[str, FakeRayMetric] = {}

    def factory(kind, name, description, tag_keys, boundaries):
        made[name] = FakeRayMetric(kind, name, description, tag_keys, boundaries)
        return made[name]

    bridge = MetricsBridge(metrics.registry, "r1", factory)
    metrics.set_scheduler_stats(3, 2, 0.5)
    metrics.on_step(num_prompt_tokens=40, num_generation_tokens=2)
    itl = [0.012, 0.03, 0.03, 0.2, 90.0]
    for seconds in itl:
        metrics.observe_inter_token_latency(seconds)
    bridge.sync()
    metrics.on_step(num_prompt_tokens=10, num_generation_tokens=1)
    metrics.observe_inter_token_latency(0.04)
    metrics.set_scheduler_stats(1, 0, 0.25)
    bridge.sync()
    bridge.sync()  # nothing new: nothing counted twice
    tags = (("engine", "0"), ("model_name", "demo"), ("replica", "r1"))
    assert made["vllm_num_requests_running"].values[tags] == 1
    assert made["vllm_kv_cache_usage_perc"].values[tags] == 0.25
    assert made["megalodon_num_requests_waiting"].values[tags] == 0
    assert made["megalodon_prompt_tokens"].values[tags] == 50
    histogram = made["megalodon_inter_token_latency_seconds"]
    assert histogram.boundaries == list(INTER_TOKEN_LATENCY_BUCKETS)
    replayed = histogram.observed[tags]
    assert bucket_counts(histogram.boundaries, replayed) == bucket_counts(histogram.boundaries, [*itl, 0.04])
    assert math.isclose(sum(replayed), sum(itl) + 0.04)
    assert not any(name.startswith(("process", "python")) for name in made)  # Ray exports its own
    assert ray_name("megalodon:x") == "megalodon_x"
