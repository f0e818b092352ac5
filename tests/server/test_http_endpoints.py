"""The small routes (/health, /version, /v1/models, /tokenize, /detokenize, /tokenizer_info) and
/metrics, parsed with prometheus-client's own parser, moving as requests complete."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import MAX_MODEL_LEN, MAX_NUM_SEQS, MODEL_NAME
from prometheus_client.parser import text_string_to_metric_families

import megalodon_infer
from server.metrics import TTFT_BUCKETS
from tests.harness import ServerProcess, wait_until


def test_health_and_version(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert http.get("/version").json() == {"version": megalodon_infer.__version__}


def test_models_lists_the_served_model(client: openai.OpenAI, http: httpx.Client, model_dir) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL_NAME]
    card = http.get("/v1/models").json()
    assert card["object"] == "list"
    entry = card["data"][0]
    assert entry["object"] == "model"
    assert entry["root"] == str(model_dir)
    assert entry["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_and_detokenize_round_trip(http: httpx.Client) -> None:
    text = "def add(a, b):\n    return a + b  # ünïcode ✓"
    with_bos = http.post("/tokenize", json={"prompt": text}).json()
    without = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False,
                                           "return_token_strs": True}).json()
    assert with_bos["tokens"] == [1, *without["tokens"]]
    assert with_bos["count"] == len(with_bos["tokens"])
    assert with_bos["max_model_len"] == MAX_MODEL_LEN
    assert with_bos["token_strs"] is None
    assert len(without["token_strs"]) == len(without["tokens"])
    assert http.post("/detokenize", json={"tokens": with_bos["tokens"]}).json() == {"prompt": text}


def test_tokenize_messages_uses_the_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    info = http.get("/tokenizer_info").json()
    assert "{{" in info["chat_template"] or "{%" in info["chat_template"]
    assert chat[0] == 1 and chat.count(1) == 1  # exactly one BOS
    open_turn = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert len(open_turn) < len(chat)


def test_detokenize_rejects_ids_outside_the_vocabulary(http: httpx.Client, vocab_size: int) -> None:
    response = http.post("/detokenize", json={"tokens": [1, vocab_size]})
    assert response.status_code == 400
    assert "vocabulary" in response.json()["error"]["message"]


def test_tokenizer_info_has_what_lm_eval_needs(http: httpx.Client) -> None:
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>"
    assert info["bos_token"] == "<s>"
    assert info["model_max_length"] == MAX_MODEL_LEN
    assert isinstance(info["chat_template"], str)


def test_metrics_parse_and_use_vllm_layouts(server: ServerProcess) -> None:
    text = httpx.get(server.base_url + "/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("num_requests_running", "num_requests_waiting", "state_slot_usage_perc"):
        assert families[f"megalodon:{name}"].type == "gauge"
    for name in ("prompt_tokens", "generation_tokens", "request_success", "http_requests_client_disconnected"):
        assert families[f"megalodon:{name}"].type == "counter"
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert families[f"megalodon:{name}"].type == "histogram"
    ttft_bounds = [float(s.labels["le"]) for s in families["megalodon:time_to_first_token_seconds"].samples
                   if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert ttft_bounds == list(TTFT_BUCKETS)
    info = families["megalodon:cache_config_info"].samples[0]
    assert info.value == 1 and info.labels["num_state_slots"] == str(MAX_NUM_SEQS)
    assert families["megalodon:model_config_info"].samples[0].labels["served_model_name"] == MODEL_NAME


@pytest.mark.parametrize("stream", [False, True])
def test_counters_move_as_requests_complete(server: ServerProcess, http: httpx.Client, stream: bool) -> None:
    assert wait_until(lambda: server.metrics()["megalodon:num_requests_running"] == 0)
    before = server.metrics()
    # a prompt no other test sends: the prefix cache (on by default) must not serve any of it
    prompt = [1, 3140 + stream, 3141, 3142, 3143]
    body = {"prompt": prompt, "max_tokens": 7, "ignore_eos": True, "stream": stream}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200

    def delta(key: str) -> float:
        return server.metrics()[key] - before[key]

    # Token counters move on the engine thread, after the step that produced the answer.
    assert wait_until(lambda: delta("megalodon:generation_tokens_total") == 7)
    assert delta("megalodon:prompt_tokens_total") == len(prompt)
    assert delta("megalodon:request_success_total{finished_reason=length}") == 1
    assert delta("megalodon:request_prompt_tokens_sum") == len(prompt)
    assert delta("megalodon:request_generation_tokens_sum") == 7
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(f"megalodon:{histogram}_count") == 1
    assert delta("megalodon:inter_token_latency_seconds_count") == 6
    assert delta("megalodon:iteration_tokens_total_sum") == len(prompt) + 7
