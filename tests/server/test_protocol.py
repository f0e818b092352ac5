"""Wire types (server/protocol.py) and their conversion to SamplingParams (server/convert.py).

Every case here is a body a real client sends (lm-eval, vllm bench, guidellm, genai-perf, the
OpenAI SDK) or a mistake a client makes and must get a clear answer for.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from megalodon_infer.sample.params import SamplingParams
from server.convert import to_sampling_params
from server.errors import InvalidParameterError
from server.protocol import (
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)
from server.protocol_extensions import TokenizeChatRequest, TokenizeCompletionRequest, TokenizeRequest

USER = [{"role": "user", "content": "hi"}]


def completion(**body: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "x", **body})


def chat(**body: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **body})


def error_of(cls: type, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    return errors[0]


# --- completions request parsing -------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["hello", ["hello"], ["a", "b"], [1, 2, 3], [[1, 2], [3]]],
    ids=["str", "list-of-one-str (genai-perf)", "batch-of-str", "token-ids (lm-eval)", "batch-of-ids"],
)
def test_every_prompt_form_is_accepted_unchanged(prompt: object) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("prompt", [["a", 1], {"text": "a"}, 5, [[1], "a"], [1.5]])
def test_malformed_prompt_gets_one_readable_error(prompt: object) -> None:
    error = error_of(CompletionRequest, {"prompt": prompt})
    assert error["loc"] == ("prompt",)
    assert "a list of token ids" in error["msg"]


@pytest.mark.parametrize("prompt", [[], [[]], [[1, 2], []]])
def test_empty_prompt_lists_are_rejected(prompt: object) -> None:
    error = error_of(CompletionRequest, {"prompt": prompt})
    assert error["loc"] == ("prompt",) and "empty" in error["msg"]


def test_negative_token_ids_are_rejected() -> None:
    assert "non-negative" in error_of(CompletionRequest, {"prompt": [1, -2]})["msg"]


def test_prompt_is_required() -> None:
    assert error_of(CompletionRequest, {"model": "m"})["loc"] == ("prompt",)


def test_unknown_fields_are_tolerated_and_kept_for_logging() -> None:
    req = completion(return_tokens_as_token_ids=True, some_vendor_field={"a": 1})
    assert req.model_extra == {"return_tokens_as_token_ids": True, "some_vendor_field": {"a": 1}}
    assert chat(tools=[], response_format={"type": "text"}).model_extra is not None


def test_client_nulls_are_accepted() -> None:
    # guidellm sends stop: null, vllm bench logprobs: null; others send null for any knob.
    req = completion(stop=None, logprobs=None, temperature=None, stream=None, echo=None, n=None)
    assert req.stop is None and req.logprobs is None and req.temperature is None
    assert req.stream is False and req.echo is False


def test_max_tokens_defaults_to_16_but_null_means_fill_the_context() -> None:
    assert completion().max_tokens == 16
    assert completion(max_tokens=None).max_tokens is None
    assert chat().max_tokens is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "many"),
        ("temperature", "hot"),
        ("stream", {"yes": 1}),
        ("n", 1.5),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("logit_bias", {"5": "big"}),
        ("stop_token_ids", ["eos"]),
        ("seed", 2**64),
        ("echo", "sometimes"),
    ],
)
def test_wrong_types_are_rejected_naming_the_field(field: str, value: object) -> None:
    error = error_of(CompletionRequest, {"prompt": "x", field: value})
    assert error["loc"][0] == field


def test_best_of_one_or_null_is_accepted_larger_is_refused() -> None:
    assert completion(best_of=1).best_of == 1
    assert completion(best_of=None).best_of is None
    error = error_of(CompletionRequest, {"prompt": "x", "best_of": 3})
    assert error["loc"] == ("best_of",) and "best_of=3 is not supported" in error["msg"]


def test_suffix_is_refused() -> None:
    error = error_of(CompletionRequest, {"prompt": "x", "suffix": "end"})
    assert error["loc"] == ("suffix",) and "not supported" in error["msg"]


def test_stream_options_require_stream() -> None:
    error = error_of(CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}})
    assert error["loc"] == ("stream_options",) and "stream" in error["msg"]
    error = error_of(ChatCompletionRequest, {"messages": USER, "stream": False, "stream_options": {}})
    assert error["loc"] == ("stream_options",)


def test_stream_options_defaults_follow_vllm() -> None:
    # Sending the object at all turns usage on (vLLM); guidellm adds continuous_usage_stats.
    assert completion(stream=True, stream_options={}).stream_options.include_usage is True
    opts = completion(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert opts.stream_options.continuous_usage_stats is True
    assert not completion(stream=True, stream_options={"include_usage": None}).stream_options.include_usage


def test_vllm_extensions_are_parsed() -> None:
    req = completion(
        top_k=40, min_p=0.1, repetition_penalty=1.1, min_tokens=2, ignore_eos=True, stop_token_ids=[7],
        include_stop_str_in_output=True, skip_special_tokens=False, add_special_tokens=False,
    )
    assert (req.top_k, req.min_p, req.repetition_penalty, req.min_tokens) == (40, 0.1, 1.1, 2)
    assert req.ignore_eos and req.include_stop_str_in_output
    assert req.stop_token_ids == [7] and req.skip_special_tokens is False and req.add_special_tokens is False


# --- chat request parsing --------------------------------------------------------------------


def test_chat_content_may_be_a_string_or_text_parts() -> None:
    # vllm bench's openai-chat backend sends a list of text parts.
    req = ChatCompletionRequest.model_validate(
        {"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ]}
    )
    assert [m.text() for m in req.messages] == ["be brief", "a\nb", ""]


def test_non_text_content_parts_are_refused_clearly() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
    error = error_of(ChatCompletionRequest, body)
    assert error["loc"] == ("messages", 0, "content")
    assert error["msg"] == "Only text content parts are supported; got a part of type 'image_url'"


@pytest.mark.parametrize("content", [5, [{"type": "text"}], [{"text": "no type"}], {"type": "text"}])
def test_malformed_content_gets_one_error(content: object) -> None:
    error = error_of(ChatCompletionRequest, {"messages": [{"role": "user", "content": content}]})
    assert error["loc"] == ("messages", 0, "content")


def test_messages_must_be_a_non_empty_list() -> None:
    assert error_of(ChatCompletionRequest, {"messages": []})["loc"] == ("messages",)
    assert error_of(ChatCompletionRequest, {"messages": "hi"})["loc"] == ("messages",)
    assert error_of(ChatCompletionRequest, {"model": "m"})["loc"] == ("messages",)


def test_chat_defaults() -> None:
    req = chat()
    assert req.add_generation_prompt is True and req.echo is False and req.logprobs is False
    assert req.add_special_tokens is False and req.max_completion_tokens is None


def test_top_logprobs_needs_logprobs_and_is_capped_at_20() -> None:
    assert error_of(ChatCompletionRequest, {"messages": USER, "top_logprobs": 2})["loc"] == ("top_logprobs",)
    assert chat(top_logprobs=0).top_logprobs == 0
    assert chat(logprobs=True, top_logprobs=20).top_logprobs == 20
    assert error_of(ChatCompletionRequest, {"messages": USER, "logprobs": True, "top_logprobs": 21})


# --- responses -------------------------------------------------------------------------------


def test_completion_response_shape() -> None:
    resp = CompletionResponse(
        model="m",
        choices=[CompletionResponseChoice(index=0, text="hi", finish_reason="length")],
        usage=UsageInfo.of(3, 2),
    )
    body = json.loads(resp.model_dump_json())
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length", "stop_reason": None}
    ]
    assert body["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": None
    }


def test_usage_reports_cached_prompt_tokens() -> None:
    usage = UsageInfo.of(100, 5, cached_tokens=64).model_dump()
    assert usage["prompt_tokens_details"] == {"cached_tokens": 64}
    assert usage["total_tokens"] == 105


def test_logprobs_are_json_safe() -> None:
    # -inf is not JSON; clients expect vLLM's -9999.0. The first echoed prompt token has null.
    lp = CompletionLogProbs(
        tokens=["a", "b"], token_logprobs=[None, float("-inf")],
        top_logprobs=[None, {"b": float("-inf")}], text_offset=[0, 1],
    )
    assert json.loads(lp.model_dump_json()) == {
        "text_offset": [0, 1], "token_logprobs": [None, -9999.0], "tokens": ["a", "b"],
        "top_logprobs": [None, {"b": -9999.0}],
    }
    chat_lp = ChatCompletionLogProbsContent(token="a", logprob=float("-inf"), bytes=[97])
    assert json.loads(chat_lp.model_dump_json()) == {
        "token": "a", "logprob": -9999.0, "bytes": [97], "top_logprobs": []
    }


def test_chat_stream_chunk_shape_and_delta_omits_unset_keys() -> None:
    role_chunk = ChatCompletionStreamResponse(
        model="m",
        choices=[ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )
    body = json.loads(role_chunk.model_dump_json())
    assert body["object"] == "chat.completion.chunk" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert body["usage"] is None
    content = ChatCompletionResponseStreamChoice(index=1, delta=DeltaMessage(content="x"), finish_reason="stop")
    assert content.model_dump()["delta"] == {"content": "x"}


def test_model_list_has_root_and_max_model_len() -> None:
    body = ModelList(data=[ModelCard(id="megalodon-7b", root="/models/megalodon-7b", max_model_len=32768)])
    data = json.loads(body.model_dump_json())
    assert data["object"] == "list"
    card = data["data"][0]
    assert card["object"] == "model" and card["root"] == "/models/megalodon-7b"
    assert card["max_model_len"] == 32768 and card["owned_by"] == "megalodon" and card["permission"] == []


def test_tokenize_request_accepts_prompt_or_messages() -> None:
    adapter = TypeAdapter(TokenizeRequest)
    plain = adapter.validate_python({"prompt": "test", "add_special_tokens": False})
    assert isinstance(plain, TokenizeCompletionRequest) and plain.add_special_tokens is False
    chat_req = adapter.validate_python({"messages": USER})
    assert isinstance(chat_req, TokenizeChatRequest) and chat_req.add_generation_prompt is True


def test_error_response_is_nested() -> None:
    body = ErrorResponse(error=ErrorInfo(message="bad", type="BadRequestError", code=400)).model_dump()
    assert body == {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}


# --- conversion to SamplingParams ------------------------------------------------------------


def test_absent_knobs_take_the_engine_defaults() -> None:
    params = to_sampling_params(completion())
    expected = SamplingParams(max_tokens=16)
    assert params == expected


def test_every_completion_field_maps_onto_sampling_params() -> None:
    req = completion(
        n=2, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"7": 5.0, "11": -100},
        seed=1234, stop=["\n\n", "END"], stop_token_ids=[2], ignore_eos=True, min_tokens=3,
        max_tokens=50, logprobs=2, include_stop_str_in_output=True, skip_special_tokens=False,
    )
    params = to_sampling_params(req)
    assert params == SamplingParams(
        n=2, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={7: 5.0, 11: -100.0}, seed=1234,
        stop=["\n\n", "END"], stop_token_ids=[2], ignore_eos=True, min_tokens=3, max_tokens=50,
        logprobs=2, prompt_logprobs=None, include_stop_str_in_output=True, skip_special_tokens=False,
    )


def test_single_stop_string_becomes_a_list() -> None:
    assert to_sampling_params(completion(stop="###")).stop == ["###"]
    assert to_sampling_params(completion(stop=None)).stop == []


def test_null_max_tokens_uses_the_servers_default() -> None:
    assert to_sampling_params(completion(max_tokens=None)).max_tokens is None  # the engine gives it the room left
    assert to_sampling_params(completion(max_tokens=0, echo=True)).max_tokens == 0


@pytest.mark.parametrize("top_k", [0, -1, None])
def test_top_k_zero_minus_one_and_null_all_disable_top_k(top_k: int | None) -> None:
    assert to_sampling_params(completion(top_k=top_k)).top_k == -1


def test_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    # lm-eval loglikelihood: echo + logprobs=1 + max_tokens=1.
    params = to_sampling_params(completion(echo=True, logprobs=1, max_tokens=1))
    assert (params.logprobs, params.prompt_logprobs) == (1, 1)
    assert to_sampling_params(completion(echo=True)).prompt_logprobs is None
    assert to_sampling_params(completion(logprobs=3)).prompt_logprobs is None
    explicit = completion(echo=True, logprobs=1, prompt_logprobs=5)
    assert to_sampling_params(explicit).prompt_logprobs == 5


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    assert to_sampling_params(chat(max_tokens=10, max_completion_tokens=20)).max_tokens == 20
    assert to_sampling_params(chat(max_tokens=10)).max_tokens == 10
    assert to_sampling_params(chat()).max_tokens is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [({}, None), ({"logprobs": False}, None), ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 5}, 5)],
)
def test_chat_logprobs_switch_and_count(body: dict, expected: int | None) -> None:
    assert to_sampling_params(chat(**body)).logprobs == expected


def test_chat_sampling_fields_map_like_completions() -> None:
    params = to_sampling_params(
        chat(temperature=0, seed=7, stop="x", logit_bias={"3": 1}, ignore_eos=True, echo=True, logprobs=True),
    )
    assert params.is_greedy and params.seed == 7 and params.stop == ["x"] and params.logit_bias == {3: 1.0}
    assert params.ignore_eos is True
    assert params.prompt_logprobs is None  # chat echo repeats the last message, it does not score it


@pytest.mark.parametrize("key", ["abc", "1.5", ""])
def test_logit_bias_keys_must_be_integer_token_ids(key: str) -> None:
    with pytest.raises(ValueError, match="logit_bias") as info:
        to_sampling_params(completion(logit_bias={key: 1.0}))
    assert info.value.param == "logit_bias"


def test_negative_logit_bias_key_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="non-negative"):
        to_sampling_params(completion(logit_bias={"-3": 1.0}))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ],
)
def test_out_of_range_values_raise_value_error_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param) as info:
        to_sampling_params(completion(**body))
    assert info.value.param == param


def test_chat_errors_name_the_field_the_client_sent() -> None:
    with pytest.raises(ValueError) as info:
        to_sampling_params(chat(max_completion_tokens=5, min_tokens=9))
    assert info.value.param == "min_tokens"
    with pytest.raises(ValueError) as info:
        to_sampling_params(chat(max_tokens=-2))
    assert info.value.param == "max_tokens"


def test_wire_modules_do_not_import_torch_or_the_engine() -> None:
    # STYLE "things to avoid" 2: wire types, errors, SSE and metrics stay importable without torch.
    code = (
        "import sys, server.protocol, server.protocol_extensions, server.errors, server.metrics, server.sse; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('megalodon_infer')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
