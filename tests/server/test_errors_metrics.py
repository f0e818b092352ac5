"""Error responses (server/errors.py), SSE framing (server/sse.py) and metrics (server/metrics.py).

Errors are exercised through a tiny FastAPI app with the real handlers installed, so each case
checks what an HTTP client (and openai-python's status -> exception mapping) actually receives.
"""

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from megalodon_infer import SamplingParams
from megalodon_infer.engine.errors import ContextLengthError
from megalodon_infer.engine.validation import RequestLimits, validate_request
from server.convert import to_sampling_params
from server.errors import (
    OpenAIError,
    context_length_message,
    install_error_handlers,
    model_not_found,
    overloaded,
    prompt_too_long_message,
    service_unavailable,
    to_openai_error,
    unauthorized,
)
from server.generation import engine_error
from server.metrics import Metrics, build_1_2_5_buckets
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.sse import SSE_DONE, SSE_KEEPALIVE, SSE_MEDIA_TYPE, sse_error_event, sse_event, sse_headers


def check_context_length(*, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The engine's context rule (the one place it lives), mapped to HTTP the way the server maps it."""
    limits = RequestLimits(vocab_size=10, output_vocab_size=10, max_model_len=max_model_len, max_num_seqs=1)
    try:
        return validate_request([1] * num_prompt_tokens, SamplingParams(max_tokens=max_tokens), limits)
    except ContextLengthError as exc:
        raise engine_error(exc) from None


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict:
        if req.model not in (None, "megalodon"):
            raise model_not_found(req.model)
        params = to_sampling_params(req)
        return {"max_tokens": params.max_tokens}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict:
        return {"n": len(req.messages)}

    @app.get("/fail/{kind}")
    async def fail(kind: str) -> dict:
        if kind == "auth":
            raise unauthorized()
        if kind == "busy":
            raise overloaded(retry_after=7)
        if kind == "loading":
            raise service_unavailable("Model is loading.")
        if kind == "context":
            check_context_length(num_prompt_tokens=4000, max_tokens=200, max_model_len=4096)
        if kind == "value":
            raise ValueError("n must be at least 1, got 0.")
        raise RuntimeError("secret internal detail at /opt/weights")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    # The 500 path re-raises after responding (so servers log it); the client must still get JSON.
    return TestClient(make_app(), raise_server_exceptions=False)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- errors ----------------------------------------------------------------------------------


def test_validation_error_is_400_naming_the_field(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400)
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == "max_tokens"
    assert error["message"].startswith("max_tokens: ")


def test_nested_validation_error_names_the_path(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.0.content"
    assert "Only text content parts are supported" in error["message"]


def test_several_validation_errors_are_all_reported(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"prompt": "x", "n": "a", "echo": "b"}), 400)
    assert "n: " in error["message"] and "echo: " in error["message"]


def test_protocol_refusals_are_400(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"prompt": "x", "best_of": 2}), 400)
    assert error["param"] == "best_of" and "best_of=2 is not supported" in error["message"]
    error = error_of(client.post("/v1/completions", json={"prompt": "x", "suffix": "s"}), 400)
    assert error["param"] == "suffix"


def test_unknown_fields_do_not_fail_the_request(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "brand_new_param": 1})
    assert response.status_code == 200 and response.json() == {"max_tokens": 3}


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    error = error_of(response, 400)
    assert error["message"].startswith("Request body is not valid JSON")


def test_missing_or_non_json_body_is_400(client: TestClient) -> None:
    assert "required" in error_of(client.post("/v1/completions"), 400)["message"]
    response = client.post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in error_of(response, 400)["message"]
    assert error_of(client.post("/v1/completions", json=["x"]), 400)["param"] is None


def test_conversion_value_error_is_400_with_param(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "x", "logit_bias": {"abc": 1}})
    error = error_of(response, 400)
    assert error["param"] == "logit_bias" and "token ids" in error["message"]
    error = error_of(client.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400)
    assert error["param"] == "temperature" and "temperature must be non-negative" in error["message"]


def test_plain_value_error_is_400(client: TestClient) -> None:
    error = error_of(client.get("/fail/value"), 400)
    assert error == {"message": "n must be at least 1, got 0.", "type": "BadRequestError", "param": None, "code": 400}


def test_unknown_model_is_404_with_openai_wording(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"}), 404)
    assert error == {
        "message": "The model `gpt-5` does not exist.", "type": "NotFoundError", "param": "model", "code": 404
    }


def test_auth_failure_is_401(client: TestClient) -> None:
    response = client.get("/fail/auth")
    error = error_of(response, 401)
    assert error["type"] == "AuthenticationError"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("path", "status", "retry_after"), [("/fail/busy", 429, "7"), ("/fail/loading", 503, "1")]
)
def test_overload_and_unavailable_carry_retry_after(
    client: TestClient, path: str, status: int, retry_after: str
) -> None:
    response = client.get(path)
    error = error_of(response, status)
    assert error["type"] == {429: "RateLimitError", 503: "ServiceUnavailableError"}[status]
    assert response.headers["retry-after"] == retry_after


def test_unexpected_exception_is_500_without_internals(client: TestClient) -> None:
    response = client.get("/fail/boom")
    error = error_of(response, 500)
    assert error == {"message": "Internal server error.", "type": "InternalServerError", "param": None, "code": 500}
    assert "secret" not in response.text and "RuntimeError" not in response.text


def test_unknown_route_and_method_use_the_same_shape(client: TestClient) -> None:
    assert error_of(client.get("/v1/nope"), 404)["type"] == "NotFoundError"
    assert error_of(client.get("/v1/completions"), 405)["code"] == 405


def test_context_length_error_matches_vllm_wording(client: TestClient) -> None:
    error = error_of(client.get("/fail/context"), 400)
    assert error["message"] == (
        "This model's maximum context length is 4096 tokens. However, you requested 200 output tokens "
        "and your prompt contains 4000 input tokens, for a total of 4200 tokens. Please reduce the "
        "length of the input prompt or the number of requested output tokens."
    )
    assert error["code"] == "context_length_exceeded" and error["param"] == "input_tokens"
    assert error["type"] == "BadRequestError"


def test_prompt_alone_too_long_uses_vllms_other_wording() -> None:
    with pytest.raises(OpenAIError) as info:
        check_context_length(num_prompt_tokens=5000, max_tokens=None, max_model_len=4096)
    assert info.value.message == (
        "This model's maximum context length is 4096 tokens. However, your request has 5000 input tokens. "
        "Please reduce the length of the input messages."
    )
    assert info.value.message == prompt_too_long_message(max_model_len=4096, num_prompt_tokens=5000)


def test_context_length_boundaries() -> None:
    # Exactly full is allowed (echo scoring with max_tokens=0 uses the whole window).
    check_context_length(num_prompt_tokens=4000, max_tokens=96, max_model_len=4096)
    check_context_length(num_prompt_tokens=4096, max_tokens=0, max_model_len=4096)
    assert check_context_length(num_prompt_tokens=4096, max_tokens=None, max_model_len=4096) == 0
    assert check_context_length(num_prompt_tokens=4000, max_tokens=None, max_model_len=4096) == 96  # the room left
    with pytest.raises(OpenAIError, match="for a total of 4097 tokens"):
        check_context_length(num_prompt_tokens=4000, max_tokens=97, max_model_len=4096)
    assert "contains 10 input tokens" in context_length_message(max_model_len=8, num_prompt_tokens=10, max_tokens=1)


# --- SSE -------------------------------------------------------------------------------------


def parse_sse(raw: bytes) -> list[str]:
    """Decode events the way openai-python does: comments skipped, data lines joined."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            assert all(line.startswith("data: ") for line in lines)
            events.append("\n".join(line[len("data: "):] for line in lines))
    return events


def test_sse_event_framing() -> None:
    assert sse_event({"a": 1, "b": "é"}) == 'data: {"a":1,"b":"é"}\n\n'.encode()
    assert sse_event('{"x": 2}') == b'data: {"x": 2}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert SSE_KEEPALIVE.startswith(b":") and SSE_KEEPALIVE.endswith(b"\n\n")


def test_sse_event_accepts_models_and_multiline_payloads() -> None:
    model_event = sse_event(CompletionRequest(prompt="p"))
    assert json.loads(parse_sse(model_event)[0])["prompt"] == "p"
    pretty = json.dumps({"a": [1, 2]}, indent=2)
    assert json.loads(parse_sse(sse_event(pretty))[0]) == {"a": [1, 2]}


def test_stream_with_keepalive_error_and_done_decodes_like_a_client() -> None:
    raw = SSE_KEEPALIVE + sse_event({"choices": []}) + sse_error_event(ValueError("bad stop")) + SSE_DONE
    events = parse_sse(raw)
    assert events[-1] == "[DONE]"
    assert json.loads(events[1]) == {
        "error": {"message": "bad stop", "type": "BadRequestError", "param": None, "code": 400}
    }


def test_sse_error_event_hides_internal_errors() -> None:
    payload = json.loads(parse_sse(sse_error_event(RuntimeError("cuda oom at 0xdead")))[0])
    assert payload["error"]["code"] == 500 and "cuda" not in payload["error"]["message"]


def test_sse_headers() -> None:
    headers = sse_headers()
    assert headers["X-Accel-Buffering"] == "no" and headers["Cache-Control"] == "no-cache"
    headers["X-Request-Id"] = "r1"
    assert "X-Request-Id" not in sse_headers()
    assert SSE_MEDIA_TYPE == "text/event-stream"


def test_to_openai_error_keeps_openai_errors() -> None:
    err = OpenAIError(409, "conflict", code="slot_busy")
    assert to_openai_error(err) is err
    assert to_openai_error(err).to_body().error.type == "ConflictError"


# --- metrics ---------------------------------------------------------------------------------


def families(metrics: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def sample_value(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def bucket_bounds(metrics: Metrics, name: str) -> list[float]:
    family = families(metrics)[name]
    bounds = [float(s.labels["le"]) for s in family.samples if s.name == name + "_bucket"]
    return [b for b in bounds if b != float("inf")]


EXPECTED_FAMILIES = {
    "megalodon:num_requests_running": "gauge",
    "megalodon:num_requests_waiting": "gauge",
    "megalodon:state_slot_usage_perc": "gauge",
    "megalodon:num_state_checkpoints": "gauge",
    "megalodon:prompt_tokens": "counter",
    "megalodon:generation_tokens": "counter",
    "megalodon:request_success": "counter",
    "megalodon:prefix_cache_queries": "counter",
    "megalodon:prefix_cache_hits": "counter",
    "megalodon:http_requests_client_disconnected": "counter",
    "megalodon:iteration_tokens_total": "histogram",
    "megalodon:time_to_first_token_seconds": "histogram",
    "megalodon:inter_token_latency_seconds": "histogram",
    "megalodon:request_time_per_output_token_seconds": "histogram",
    "megalodon:e2e_request_latency_seconds": "histogram",
    "megalodon:request_queue_time_seconds": "histogram",
    "megalodon:request_inference_time_seconds": "histogram",
    "megalodon:request_prefill_time_seconds": "histogram",
    "megalodon:request_decode_time_seconds": "histogram",
    "megalodon:request_prompt_tokens": "histogram",
    "megalodon:request_generation_tokens": "histogram",
    "megalodon:request_params_n": "histogram",
    "megalodon:request_params_max_tokens": "histogram",
    # what routers written for vLLM score replicas by
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
}


def test_metrics_render_parse_with_expected_names_types_and_labels() -> None:
    metrics = Metrics("megalodon-7b", max_model_len=4096)
    found = families(metrics)
    for name, kind in EXPECTED_FAMILIES.items():
        assert found[name].type == kind, name
        for sample in found[name].samples:
            if not sample.name.endswith("_created"):
                assert sample.labels["model_name"] == "megalodon-7b" and sample.labels["engine"] == "0"
    assert "process_cpu_seconds_total" in metrics.render().decode()
    assert metrics.content_type.startswith("text/plain")


def test_counters_gauges_and_histograms_move() -> None:
    metrics = Metrics("m", max_model_len=2048)
    metrics.on_step(num_prompt_tokens=100, num_generation_tokens=4)
    metrics.on_step(num_prompt_tokens=0, num_generation_tokens=4)
    metrics.on_prefix_cache_lookup(num_queried_tokens=100, num_hit_tokens=64)
    metrics.set_scheduler_stats(3, 5, 0.75, num_checkpoints=12)
    metrics.observe_ttft(0.03)
    metrics.observe_inter_token_latency(0.02)
    metrics.on_client_disconnect()
    metrics.on_request_finished(
        finished_reason="length", num_prompt_tokens=100, num_generation_tokens=5, e2e_latency_s=1.25,
        queue_time_s=0.05, prefill_time_s=0.2, decode_time_s=0.8, max_tokens=5, n=1,
    )
    metrics.on_request_finished(
        finished_reason="abort", num_prompt_tokens=10, num_generation_tokens=0, e2e_latency_s=0.1,
        queue_time_s=0.1, prefill_time_s=0.0, decode_time_s=0.0,
    )
    value = lambda name, **labels: sample_value(metrics, name, **labels)  # noqa: E731
    assert value("megalodon:prompt_tokens_total") == 100
    assert value("megalodon:generation_tokens_total") == 8
    assert value("megalodon:iteration_tokens_total_count") == 2
    assert value("megalodon:iteration_tokens_total_sum") == 108
    assert value("megalodon:prefix_cache_queries_total") == 100
    assert value("megalodon:prefix_cache_hits_total") == 64
    assert value("megalodon:num_requests_running") == 3 and value("megalodon:num_requests_waiting") == 5
    assert value("megalodon:state_slot_usage_perc") == 0.75
    assert value("vllm:num_requests_running") == 3 and value("vllm:num_requests_waiting") == 5
    assert value("vllm:kv_cache_usage_perc") == 0.75
    assert value("megalodon:num_state_checkpoints") == 12
    assert value("megalodon:http_requests_client_disconnected_total") == 1
    assert value("megalodon:request_success_total", finished_reason="length") == 1
    assert value("megalodon:request_success_total", finished_reason="abort") == 1
    assert value("megalodon:request_success_total", finished_reason="stop") == 0
    assert value("megalodon:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert value("megalodon:time_to_first_token_seconds_bucket", le="0.02") == 0
    assert value("megalodon:inter_token_latency_seconds_count") == 1
    assert value("megalodon:e2e_request_latency_seconds_count") == 2
    assert value("megalodon:e2e_request_latency_seconds_sum") == pytest.approx(1.35)
    assert value("megalodon:request_inference_time_seconds_sum") == pytest.approx(1.0)
    assert value("megalodon:request_queue_time_seconds_sum") == pytest.approx(0.15)
    assert value("megalodon:request_prefill_time_seconds_sum") == pytest.approx(0.2)
    assert value("megalodon:request_decode_time_seconds_sum") == pytest.approx(0.8)
    # Mean time per output token counts gaps between tokens: 0.8 s over 4 gaps.
    assert value("megalodon:request_time_per_output_token_seconds_sum") == pytest.approx(0.2)
    assert value("megalodon:request_time_per_output_token_seconds_count") == 1
    assert value("megalodon:request_prompt_tokens_sum") == 110
    assert value("megalodon:request_generation_tokens_sum") == 5
    assert value("megalodon:request_params_max_tokens_count") == 1
    assert value("megalodon:request_params_n_count") == 2


# vLLM's layouts (v1 metrics loggers), written out so a drift in our constants fails here.
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
             2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
            2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_ITERATION_TOKENS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def test_bucket_layouts_match_vllm() -> None:
    metrics = Metrics("m", max_model_len=4096)
    assert bucket_bounds(metrics, "megalodon:time_to_first_token_seconds") == VLLM_TTFT
    assert bucket_bounds(metrics, "megalodon:inter_token_latency_seconds") == VLLM_ITL
    assert bucket_bounds(metrics, "megalodon:request_time_per_output_token_seconds") == VLLM_ITL
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds"):
        assert bucket_bounds(metrics, "megalodon:" + name) == VLLM_REQUEST_LATENCY
    token_buckets = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert bucket_bounds(metrics, "megalodon:request_prompt_tokens") == token_buckets
    assert bucket_bounds(metrics, "megalodon:request_generation_tokens") == token_buckets
    assert bucket_bounds(metrics, "megalodon:request_params_max_tokens") == token_buckets
    assert bucket_bounds(metrics, "megalodon:request_params_n") == [1, 2, 5, 10, 20]
    assert bucket_bounds(metrics, "megalodon:iteration_tokens_total") == VLLM_ITERATION_TOKENS


def test_1_2_5_buckets_include_the_limit_when_it_is_on_the_series() -> None:
    assert build_1_2_5_buckets(1) == [1]
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(99) == [1, 2, 5, 10, 20, 50]


def test_each_metrics_instance_has_its_own_registry() -> None:
    first, second = Metrics("a", max_model_len=64), Metrics("b", max_model_len=64)
    first.on_step(num_prompt_tokens=5, num_generation_tokens=0)
    assert sample_value(first, "megalodon:prompt_tokens_total") == 5
    assert sample_value(second, "megalodon:prompt_tokens_total") == 0


def test_config_info_gauges_carry_labels_and_can_be_replaced() -> None:
    metrics = Metrics("m", max_model_len=64)
    metrics.set_cache_config_info(chunk_size=2048, num_state_slots=8, enable_prefix_caching=True)
    assert sample_value(
        metrics, "megalodon:cache_config_info", chunk_size="2048", num_state_slots="8", enable_prefix_caching="True"
    ) == 1
    metrics.set_cache_config_info(chunk_size=1024)
    info = families(metrics)["megalodon:cache_config_info"]
    assert [s.labels for s in info.samples] == [{"chunk_size": "1024"}]
    metrics.set_model_config_info(model_dim=1024, num_layers=12)
    assert sample_value(metrics, "megalodon:model_config_info", num_layers="12") == 1
