"""megalodon-serve-cluster on a local Ray cluster (2 CPUs, loopback, the bundled model), end to end.

One cluster for the module, started by the real command with 2 engine replicas and a state store.
20 conversations of 3 turns (greedy, session ids) are compared token for token with a single
`megalodon-serve` run of the same conversations; between turns 2 and 3 one replica is killed,
with a long request in flight on it.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from megalodon_infer.config import DEMO_MODEL_DIR
from tests.harness import ServerProcess, free_port, interpreter_env, wait_until

pytestmark = pytest.mark.slow

CONVERSATIONS = 20
FOLLOW_UPS = ("Now add a docstring.", "Add type hints too.")
MAX_TOKENS = 8
SIDE_PROMPT = "class Stack:\n    def __init__(self):\n"
SIDE_MAX_TOKENS = 1024  # seconds of decoding: still running when its replica is killed 1 s in
REPLICA_HEADER = "x-megalodon-replica"


def first_question(i: int) -> str:
    return f"Write a Python function number {i} that returns {i} squared."


def chat_turn(base_url: str, i: int, history: list[dict]) -> dict:
    """One turn of conversation `i`: its reply, cached tokens and the replica that served it."""
    response = httpx.post(base_url + "/v1/chat/completions", headers={"X-Session-Id": f"conversation-{i}"},
                          json={"messages": history, "max_tokens": MAX_TOKENS, "temperature": 0}, timeout=300)
    body = response.json()
    assert response.status_code == 200, body
    return {"content": body["choices"][0]["message"]["content"],
            "cached": body["usage"]["prompt_tokens_details"]["cached_tokens"],
            "replica": response.headers.get(REPLICA_HEADER)}


def run_turn(base_url: str, histories: list[list[dict]], question: str | None, workers: int = 2) -> list[dict]:
    """The next turn of every conversation (`question` appended first, unless None), `workers` at a time."""
    if question is not None:
        for history in histories:
            history.append({"role": "user", "content": question})
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda i: chat_turn(base_url, i, histories[i]), range(len(histories))))
    for history, result in zip(histories, results, strict=True):
        history.append({"role": "assistant", "content": result["content"]})
    return results


def side_request(base_url: str, key: str) -> httpx.Response:
    return httpx.post(base_url + "/v1/completions", headers={"X-Session-Id": key}, timeout=300,
                      json={"prompt": SIDE_PROMPT, "max_tokens": SIDE_MAX_TOKENS, "temperature": 0})


@pytest.fixture(scope="module")
def single_server(tmp_path_factory) -> dict:
    """The specification: every turn of every conversation, and the side request, on one megalodon-serve."""
    server = ServerProcess(DEMO_MODEL_DIR, tmp_path_factory.mktemp("single") / "server.log")
    try:
        server.wait_healthy()
        histories = [[{"role": "user", "content": first_question(i)}] for i in range(CONVERSATIONS)]
        turns = [run_turn(server.base_url, histories, None)]
        turns += [run_turn(server.base_url, histories, question) for question in FOLLOW_UPS]
        side = side_request(server.base_url, "side").json()
    finally:
        assert server.terminate() == 0
    # the kill below relies on the side request decoding for a while
    assert side["usage"]["completion_tokens"] == SIDE_MAX_TOKENS, side["usage"]
    return {"turns": turns, "side": side["choices"][0]["text"]}


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.store = tmp / "states"
        self.metrics_port = free_port()
        port = free_port()
        env = {**interpreter_env(), "MEGALODON_HOST": "127.0.0.1", "MEGALODON_PORT": str(port),
               # loopback only (the command binds its local cluster to 127.0.0.1), so the test's own
               # driver may connect without Ray's token
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        argv = [sys.executable, "-m", "megalodon_cluster.cli", "--replicas", "2", "--num-cpus", "2",
                "--torch-threads", "1", "--state-store-dir", str(self.store), "--health-check-period-s", "2",
                "--metrics-export-port", str(self.metrics_port), "--log-level", "warning"]
        self.process = ServerProcess.from_command(argv, env, tmp / "cluster.log")
        self.base_url = self.process.base_url

    def ray_address(self) -> str:
        match = re.search(r"ready on \S+ \(Ray at (\S+)\)", self.process.log_text())
        assert match, self.process.log_tail()
        return match.group(1)

    def stored_states(self) -> int:
        return len(list(self.store.glob("*/*/*/*.safetensors")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, single_server):  # the single server first: the two never share the CPUs
    import ray

    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.process.wait_healthy()
        assert wait_until(lambda: "ready on" in cluster.process.log_text(), timeout_s=30)
        ray.init(address=cluster.ray_address(), logging_level="ERROR", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        assert cluster.process.terminate(timeout_s=120) == 0, cluster.process.log_tail()


def test_requests_without_a_key_spread_over_both_replicas(cluster):
    def complete(i: int) -> str | None:
        response = httpx.post(cluster.base_url + "/v1/completions", timeout=300,
                              json={"prompt": f"def f{i}(x):", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        return response.headers.get(REPLICA_HEADER)

    with ThreadPoolExecutor(4) as pool:
        served = Counter(pool.map(complete, range(12)))
    assert len(served) == 2 and None not in served, served


def test_every_replicas_metrics_reach_rays_export(cluster):
    def series() -> dict[str, dict[str, float]]:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
        found: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if "replica" in sample.labels:
                    found.setdefault(sample.name, {})[sample.labels["replica"]] = sample.value
        return found

    def exported() -> bool:
        found = series()
        finished = sum(found.get("ray_megalodon_request_success_total", {}).values())
        return all(len(found.get(name, {})) == 2 for name in (
            "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
            "ray_megalodon_time_to_first_token_seconds_count")) and finished >= 12

    assert wait_until(exported, timeout_s=60, interval_s=1), sorted(series())


def test_conversations_stay_affine_match_one_server_and_survive_a_replica_kill(cluster, single_server):
    import ray

    expected = single_server["turns"]
    histories = [[{"role": "user", "content": first_question(i)}] for i in range(CONVERSATIONS)]
    stored_before = cluster.stored_states()
    turns = [run_turn(cluster.base_url, histories, None), run_turn(cluster.base_url, histories, FOLLOW_UPS[0])]
    for t in (0, 1):
        assert [r["content"] for r in turns[t]] == [r["content"] for r in expected[t]], f"turn {t + 1}"
    assert [r["cached"] for r in turns[1]] == [r["cached"] for r in expected[1]], (turns, expected[1])
    assert all(r["cached"] > 0 for r in turns[1])
    same = sum(a["replica"] == b["replica"] for a, b in zip(turns[0], turns[1], strict=True))
    assert same >= CONVERSATIONS - 2, f"only {same} of {CONVERSATIONS} second turns went to their first replica"
    # every finished turn is in the store before the kill (writes are queued, so wait for them)
    assert wait_until(lambda: cluster.stored_states() >= stored_before + 2 * CONVERSATIONS, timeout_s=30)

    victim = turns[1][0]["replica"]
    moved = [i for i in range(CONVERSATIONS) if turns[1][i]["replica"] == victim]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(side_request, cluster.base_url, "conversation-0")  # routed to the victim
        time.sleep(1.0)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::megalodon#megalodon-engine#{victim}", namespace="serve"),
                 no_restart=True)
        side = in_flight.result()
    assert side.status_code == 200, side.text
    assert side.json()["choices"][0]["text"] == single_server["side"]
    assert side.headers[REPLICA_HEADER] != victim, victim  # sent again, to a live replica

    third = run_turn(cluster.base_url, histories, FOLLOW_UPS[1], workers=4)
    assert [r["content"] for r in third] == [r["content"] for r in expected[2]]
    assert [r["cached"] for r in third] == [r["cached"] for r in expected[2]], (third, expected[2])
    assert all(third[i]["replica"] != victim and third[i]["cached"] > 0 for i in moved), (victim, moved, third)
