"""Every error path of the real server: status, OpenAI's nested error shape, and what the official
client raises for it."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from conftest import API_KEYS, MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_REQUEST_BYTES, MAX_WAITING, MODEL_NAME

from tests.harness import ServerProcess, wait_until

CONTEXT_LENGTH_RE = re.compile(
    r"This model's maximum context length is (\d+) tokens\. However, you requested (\d+) output tokens and your "
    r"prompt contains (\d+) input tokens, for a total of (\d+) tokens\. Please reduce the length of the input "
    r"prompt or the number of requested output tokens\."
)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The body is exactly `{"error": {message, type, param, code}}` with the given status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    expected_type = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                     413: "RequestTooLargeError", 429: "RateLimitError"}[status]
    assert error["type"] == expected_type
    if param is not None:
        assert error["param"] == param
    return error


def post_raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("content", [b'{"prompt": "x", "max_tokens": ', b"not json at all", b"\xff\xfe{}"])
def test_malformed_json_or_bad_utf8_is_400(http: httpx.Client, content: bytes) -> None:
    assert_error(post_raw(http, "/v1/completions", content), 400)


def test_body_that_is_not_an_object_is_400(http: httpx.Client) -> None:
    assert_error(post_raw(http, "/v1/completions", b'["x"]'), 400)
    assert_error(http.post("/v1/completions", content=b"prompt=x"), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "n": 1.5}, "n"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
    ],
)
def test_invalid_completion_fields_are_400_naming_the_field(http: httpx.Client, body: dict, param: str) -> None:
    assert_error(http.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ],
)
def test_invalid_chat_fields_are_400(http: httpx.Client, body: dict, param: str | None) -> None:
    error = assert_error(http.post("/v1/chat/completions", json=body), 400)
    if param is not None:
        assert error["param"].startswith(param)


def test_the_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=-5)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "max_tokens"


def test_unknown_fields_and_nulls_are_tolerated(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "stop": None, "logprobs": None, "best_of": 1,
            "user": "someone", "repetition_penalty": 1.0, "some_vendor_extension": {"a": 1}, "priority": 3}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    chat = {"messages": [{"role": "user", "content": "x", "extra": 1}], "max_tokens": 2, "tools_hint": None}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


@pytest.mark.parametrize("prompt", [[], [[]], [[1, 2], []]])
def test_empty_prompt_lists_are_400(http: httpx.Client, prompt: list) -> None:
    assert_error(http.post("/v1/completions", json={"prompt": prompt}), 400, param="prompt")


def test_prompt_with_no_tokens_is_400(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/completions", json={"prompt": "", "add_special_tokens": False}), 400)
    assert "at least one token" in error["message"]
    # With the BOS token, an empty string is a one-token prompt, as in vLLM.
    assert http.post("/v1/completions", json={"prompt": "", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_token_ids_are_400_even_when_streaming(http: httpx.Client, vocab_size: int, stream: bool) -> None:
    error = assert_error(http.post("/v1/completions", json={"prompt": [1, vocab_size + 5], "stream": stream}), 400)
    assert str(vocab_size) in error["message"]
    assert_error(http.post("/v1/completions", json={"prompt": [1, -1], "stream": stream}), 400, param="prompt")


def test_lone_surrogate_text_is_400(http: httpx.Client) -> None:
    content = b'{"prompt": "abc \\ud800 def"}'
    assert_error(post_raw(http, "/v1/completions", content), 400, param="prompt")
    chat = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    assert_error(post_raw(http, "/v1/chat/completions", chat), 400, param="messages.0.content")


def test_prompt_plus_max_tokens_over_the_limit_uses_vllms_wording(http: httpx.Client) -> None:
    prompt = [5] * (MAX_MODEL_LEN - 48)
    error = assert_error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 100}), 400,
                         param="input_tokens")
    assert error["code"] == "context_length_exceeded"
    match = CONTEXT_LENGTH_RE.fullmatch(error["message"])
    assert match is not None, error["message"]
    assert [int(g) for g in match.groups()] == [MAX_MODEL_LEN, 100, MAX_MODEL_LEN - 48, MAX_MODEL_LEN + 52]


@pytest.mark.parametrize("max_tokens", [10**9, 2**63])
def test_huge_max_tokens_is_a_context_length_error(http: httpx.Client, max_tokens: int) -> None:
    error = assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": max_tokens}), 400)
    assert error["code"] == "context_length_exceeded"
    assert CONTEXT_LENGTH_RE.fullmatch(error["message"])


def test_over_long_prompt_is_400_for_completions_and_chat(http: httpx.Client, client: openai.OpenAI) -> None:
    error = assert_error(http.post("/v1/completions", json={"prompt": [5] * (MAX_MODEL_LEN + 10)}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens.")
    long_text = "word " * (MAX_MODEL_LEN * 2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": long_text}])
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_is_404(http: httpx.Client, client: openai.OpenAI) -> None:
    error = assert_error(http.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"}), 404, param="model")
    assert error["message"] == "The model `gpt-17` does not exist."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    assert_error(http.post("/tokenize", json={"model": "gpt-17", "prompt": "x"}), 404)


def test_api_key_is_required_except_on_public_routes(server: ServerProcess) -> None:
    url = server.base_url
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(url + "/v1/completions", json=body), 401)
    assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": API_KEYS[0]}), 401)
    assert_error(httpx.get(url + "/v1/models"), 401)
    for key in API_KEYS:  # every configured key works
        response = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    for public in ("/health", "/metrics", "/version"):
        assert httpx.get(url + public).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = json.dumps({"prompt": "a" * (MAX_REQUEST_BYTES + 10)}).encode()
    assert_error(post_raw(http, "/v1/completions", big), 413)

    def chunked():
        yield big[: len(big) // 2]
        yield big[len(big) // 2:]

    assert_error(http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413)


def test_full_queue_is_429_with_retry_after(server: ServerProcess, http: httpx.Client) -> None:
    """All slots busy (one request with n = max_num_seqs), then more prompts than may wait."""
    blocker = {"prompt": "x", "n": MAX_NUM_SEQS, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=blocker) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # the slots are taken
        too_many = {"prompt": [[7, 8, 9]] * (MAX_WAITING + 1), "max_tokens": 4}
        response = http.post("/v1/completions", json=too_many)
        assert_error(response, 429)
        assert int(response.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0).completions.create(
                model=MODEL_NAME, prompt=[[7, 8, 9]] * (MAX_WAITING + 1), max_tokens=4)
    # The refused request's other prompts were withdrawn and the blocker aborted: the engine is idle.
    assert wait_until(lambda: server.metrics()["megalodon:num_requests_running"] == 0
                      and server.metrics()["megalodon:num_requests_waiting"] == 0)


def test_request_id_is_echoed_or_generated(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    generated = http.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert http.get("/health").headers["x-request-id"] != generated
    error = http.post("/v1/completions", json={"prompt": "x", "n": 0}, headers={"X-Request-Id": "trace-43"})
    assert error.headers["x-request-id"] == "trace-43"


def test_access_log_has_request_id_status_tokens_and_latency(server: ServerProcess, http: httpx.Client) -> None:
    http.post("/v1/completions", json={"prompt": [1, 5, 6], "max_tokens": 4, "ignore_eos": True},
              headers={"X-Request-Id": "trace-log-1"})
    http.post("/v1/completions", json={"prompt": "x", "n": 0}, headers={"X-Request-Id": "trace-log-2"})
    ok = re.compile(r'trace-log-1 \S+ "POST /v1/completions" 200 prompt_tokens=3 completion_tokens=4 '
                    r"latency_ms=\d+\.\d")
    refused = re.compile(r'trace-log-2 \S+ "POST /v1/completions" 400 prompt_tokens=- completion_tokens=-')
    assert wait_until(lambda: ok.search(server.log_text()) is not None and refused.search(server.log_text()))


def test_requests_the_engine_cannot_run_are_400(http: httpx.Client, vocab_size: int) -> None:
    error = assert_error(http.post("/v1/completions", json={"prompt": "x", "n": MAX_NUM_SEQS + 1}), 400)
    assert str(MAX_NUM_SEQS) in error["message"]
    assert_error(http.post("/v1/completions", json={"prompt": "x", "logit_bias": {str(vocab_size + 1): 5}}), 400)
