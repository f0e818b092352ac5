"""Recurrent-state endpoints over real HTTP: /props, prefix-cache metrics, sessions across a restart."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from megalodon_infer import SamplingParams
from megalodon_infer.engine.llm import LLM
from tests.harness import ServerProcess


def completion_ids(base_url: str, prompt: list[int], max_tokens: int) -> tuple[list[int], dict]:
    """Greedy completion of token ids; returns the generated ids (vLLM's token_id:N form) and usage."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
            "return_tokens_as_token_ids": True, "ignore_eos": True}
    reply = httpx.post(base_url + "/v1/completions", json=body, timeout=120).json()
    tokens = [int(t.removeprefix("token_id:")) for t in reply["choices"][0]["logprobs"]["tokens"]]
    return tokens, reply["usage"]


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sessions")


def start(model_dir: Path, session_dir: Path, log: Path) -> ServerProcess:
    server = ServerProcess(model_dir, log, ["--prefix-cache-bytes", str(64 << 20), "--session-dir", str(session_dir),
                                            "--max-num-seqs", "4"])
    server.wait_healthy()
    return server


@pytest.mark.slow
def test_session_survives_a_restart_and_the_next_turn_hits_it(model_dir, session_dir, tmp_path):
    first = start(model_dir, session_dir, tmp_path / "first.log")
    try:
        props = httpx.get(first.base_url + "/props").json()
        C = props["chunk_size"]
        assert props["prefix_cache"]["enabled"] and props["sessions"]
        assert props["bytes_per_snapshot_at_chunk_boundary"] < props["bytes_per_slot"]
        prompt = httpx.post(first.base_url + "/tokenize",
                            json={"prompt": "def fibonacci(n):\n    " * (C // 6 + 2)}).json()["tokens"]
        reply, _ = completion_ids(first.base_url, prompt, 12)
        saved = httpx.post(first.base_url + "/v1/sessions/save", json={"name": "fib-1", "prompt": prompt + reply})
        assert saved.status_code == 200, saved.text
        num_tokens = saved.json()["num_tokens"]
        assert num_tokens == len(prompt) + len(reply) - 1  # all but the reply's unconsumed last token
        metrics = first.metrics()
        assert metrics["megalodon:prefix_cache_stored_bytes"] > 0
        assert httpx.get(first.base_url + "/props").json()["prefix_cache"]["entries"] > 0
    finally:
        assert first.terminate() == 0

    second = start(model_dir, session_dir, tmp_path / "second.log")
    try:
        loaded = httpx.post(second.base_url + "/v1/sessions/load", json={"name": "fib-1"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["num_tokens"] == num_tokens
        next_turn = prompt + reply + prompt[1:6]
        tokens, usage = completion_ids(second.base_url, next_turn, 10)
        assert usage["prompt_tokens_details"]["cached_tokens"] == num_tokens
        assert second.metrics()["megalodon:prefix_cache_hits_total"] >= num_tokens
    finally:
        assert second.terminate() == 0
    expected = LLM(model_dir).generate([next_turn], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert tokens == expected[0].outputs[0].token_ids


@pytest.mark.slow
def test_session_errors(model_dir, session_dir, tmp_path, server, http):
    own = start(model_dir, session_dir, tmp_path / "errors.log")
    try:
        for name in ("../escape", "a/b", ".hidden", ""):
            bad = httpx.post(own.base_url + "/v1/sessions/load", json={"name": name})
            assert bad.status_code == 400 and "session names" in bad.json()["error"]["message"]
        missing = httpx.post(own.base_url + "/v1/sessions/load", json={"name": "never-saved"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
        unknown = httpx.post(own.base_url + "/v1/sessions/save", json={"name": "x", "prompt": [1, 2, 3, 4]})
        assert unknown.status_code == 400 and "no cached state" in unknown.json()["error"]["message"]
        both = httpx.post(own.base_url + "/v1/sessions/save", json={"name": "x"})
        assert both.status_code == 400
    finally:
        assert own.terminate() == 0
    # the shared test server runs without --session-dir: sessions are refused, with the reason
    off = http.post("/v1/sessions/load", json={"name": "x"})
    assert off.status_code == 400 and "--session-dir" in off.json()["error"]["message"]
