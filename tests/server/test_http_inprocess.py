"""The app in-process (Starlette's TestClient, lifespan included) for what a healthy server process
cannot show: an engine failure in the middle of a stream, a model still loading or failing to
load, and a checkpoint without a tokenizer."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.model.loading import load_model
from server.app import build_app
from server.generation import ENGINE_FAILED_MESSAGE
from server.settings import ServerSettings
from server.state import load_engine
from tests.harness import wait_until

SECRET = "/opt/secret/weights.bin"


class FailingDecode:
    """Wraps the model runner's decode; raises once, on the call `fail_at`."""

    def __init__(self, decode: Callable) -> None:
        self.decode = decode
        self.calls = 0
        self.fail_at: int | None = None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            self.fail_at = None
            raise RuntimeError(f"simulated device failure reading {SECRET}")
        return self.decode(*args, **kwargs)


def settings_for(model_dir: Path) -> ServerSettings:
    return ServerSettings(model=model_dir, served_model_name="m", max_num_seqs=2, max_model_len=512,
                          keepalive_interval=5.0)


def healthy(client: TestClient) -> bool:
    return client.get("/health").status_code == 200


@pytest.fixture
def failing_app(model_dir: Path) -> Iterator[tuple[TestClient, FailingDecode]]:
    holder: dict[str, FailingDecode] = {}

    def factory(settings: ServerSettings) -> LLMEngine:
        engine = load_engine(settings)
        holder["decode"] = engine.runner.decode = FailingDecode(engine.runner.decode)
        return engine

    with TestClient(build_app(settings_for(model_dir), engine_factory=factory)) as client:
        assert wait_until(lambda: healthy(client))
        yield client, holder["decode"]


def test_engine_failure_mid_stream_is_an_error_event_then_done(failing_app) -> None:
    client, decode = failing_app
    decode.fail_at = decode.calls + 3
    body = {"prompt": "x", "max_tokens": 20, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error == {"error": {"message": ENGINE_FAILED_MESSAGE, "type": "InternalServerError", "param": None,
                               "code": 500}}
    chunks = [json.loads(event) for event in events[:-2]]
    assert chunks and all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)

    metrics = client.get("/metrics").text
    assert 'megalodon:request_success_total{engine="0",finished_reason="error",model_name="m"} 1.0' in metrics


def test_engine_failure_reaches_the_openai_client(failing_app) -> None:
    client, decode = failing_app
    sdk = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="none", http_client=client, max_retries=0)
    decode.fail_at = decode.calls + 2
    with pytest.raises(openai.APIError) as info:
        for _ in sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=20, stream=True, extra_body={"ignore_eos": True}):
            pass
    assert SECRET not in str(info.value)

    decode.fail_at = decode.calls + 2
    with pytest.raises(openai.InternalServerError) as info:
        sdk.completions.create(model="m", prompt="x", max_tokens=20, extra_body={"ignore_eos": True})
    assert info.value.status_code == 500
    assert SECRET not in info.value.response.text
    # The engine lives on: the next request succeeds.
    assert sdk.completions.create(model="m", prompt="x", max_tokens=3).choices[0].finish_reason is not None


def test_health_is_503_while_loading(model_dir: Path) -> None:
    release = threading.Event()

    def slow_factory(settings: ServerSettings) -> LLMEngine:
        release.wait(timeout=60)
        return load_engine(settings)

    with TestClient(build_app(settings_for(model_dir), engine_factory=slow_factory)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503
        assert loading.headers["Retry-After"] == "5"
        assert "loading" in loading.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == "m"
        release.set()
        assert wait_until(lambda: healthy(client))
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_model_that_fails_to_load_is_reported_and_stops_the_server(model_dir: Path) -> None:
    fatal = threading.Event()

    def broken_factory(settings: ServerSettings) -> LLMEngine:
        raise ValueError("config.json: num_layers must be positive")

    app = build_app(settings_for(model_dir), engine_factory=broken_factory, on_fatal=fatal.set)
    with TestClient(app) as client:
        assert fatal.wait(timeout=30)
        response = client.get("/health")
        assert response.status_code == 503
        assert "failed to load" in response.json()["error"]["message"]


def test_a_model_without_tokenizer_takes_token_ids_only(model_dir: Path) -> None:
    def factory(settings: ServerSettings) -> LLMEngine:
        return LLMEngine(load_model(settings.model), None, settings.engine_config())

    with TestClient(build_app(settings_for(model_dir), engine_factory=factory)) as client:
        assert wait_until(lambda: healthy(client))
        for path, body in [("/v1/completions", {"prompt": "text"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/tokenize", {"prompt": "text"})]:
            response = client.post(path, json=body)
            assert response.status_code == 400
            assert "no tokenizer" in response.json()["error"]["message"]
        result = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "logprobs": 0,
                                                      "ignore_eos": True}).json()
        choice = result["choices"][0]
        assert choice["text"] == ""
        assert len(choice["logprobs"]["tokens"]) == 4
        assert all(token.startswith("token_id:") for token in choice["logprobs"]["tokens"])
        assert result["usage"]["completion_tokens"] == 4


def test_prefix_cache_hits_show_in_usage_and_metrics(model_dir: Path) -> None:
    settings = settings_for(model_dir).model_copy(update={"prefix_cache_bytes": 1 << 24})
    prompt = list(range(3, 3 + 100))  # several chunks: boundary states are cached during prefill
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with TestClient(build_app(settings)) as client:
        assert wait_until(lambda: healthy(client))
        first = client.post("/v1/completions", json=body).json()
        second = client.post("/v1/completions", json=body).json()
        metrics = client.get("/metrics").text
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    hits = next(line for line in metrics.splitlines() if line.startswith("megalodon:prefix_cache_hits_total"))
    assert float(hits.split()[-1]) >= second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 'enable_prefix_caching="True"' in metrics
