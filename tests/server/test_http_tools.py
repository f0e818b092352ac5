"""Tool calling in chat through the official openai client: forced calls whose arguments validate
against the function's schema (streamed as the SDK accumulates them, and not), named functions,
parallel calls, `auto` parsing, tool results in the conversation, and 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL_NAME

WEATHER = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome", "Oslo"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "units": {"type": "object", "properties": {"metric": {"type": "boolean"}}, "required": ["metric"],
              "additionalProperties": False}},
    "required": ["city", "days", "units"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]


def chat(client: openai.OpenAI, **kwargs: object):
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, **kwargs)


def check_calls(calls, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.slow
def test_required_tool_calls_validate_whole_and_streamed(client: openai.OpenAI) -> None:
    for seed in range(3):
        kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0.8,
                      seed=seed, max_tokens=200, parallel_tool_calls=False)
        choice = client.chat.completions.create(**kwargs).choices[0]
        # one call, then the complete grammar forces EOS: the answer ends by itself
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls, set(SCHEMAS))
        with client.chat.completions.stream(**kwargs) as stream:  # the SDK's accumulating helper
            streamed = stream.get_final_completion().choices[0]
        assert streamed.finish_reason == "tool_calls"
        check_calls(streamed.message.tool_calls, set(SCHEMAS))
        # the same seed: the stream carries the same calls, piece by piece
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_parallel_required_calls_each_validate(client: openai.OpenAI) -> None:
    """The model decides how many calls to make (the bundled code model rarely stops on its own):
    every call it finished validates; only a call cut by max_tokens can be incomplete."""
    choice = chat(client, tool_choice="required", temperature=0.8, seed=7, max_tokens=150).choices[0]
    calls = choice.message.tool_calls
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert calls and choice.finish_reason in ("tool_calls", "length")
    check_calls(complete, set(SCHEMAS))


def test_a_named_function_without_parallel_calls_is_called_once(client: openai.OpenAI) -> None:
    for seed in range(2):
        result = chat(client, tool_choice={"type": "function", "function": {"name": "get_time"}},
                      parallel_tool_calls=False, temperature=0.8, seed=seed, max_tokens=120, n=2)
        for choice in result.choices:
            assert len(choice.message.tool_calls) == 1
            check_calls(choice.message.tool_calls, {"get_time"})


def test_auto_parses_calls_out_of_the_text(client: openai.OpenAI) -> None:
    """With `auto` the answer is free text, parsed afterwards: forced here (by a regex) to be a sentence
    then a call, in the template's format."""
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2, "units": {"metric": true}}}'
    forced = "Checking\\.\n<tool_call>\n" + call.replace("{", "\\{").replace("}", "\\}") + "\n</tool_call>"
    kwargs = dict(tool_choice="auto", temperature=0.8, max_tokens=120,
                  extra_body={"structured_outputs": {"regex": forced}})
    result = chat(client, **kwargs)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city": "Oslo", "days": 2, "units": {"metric": true}}')]
    chunks = list(chat(client, stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    pieces = [t for d in deltas for t in d.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == choice.message.tool_calls[0].function.arguments
    # with tool_choice "none" the same text is plain content
    plain = chat(client, **{**kwargs, "tool_choice": "none"}).choices[0]
    assert plain.message.tool_calls is None and "<tool_call>" in plain.message.content


def test_a_conversation_with_tool_results_continues(client: openai.OpenAI) -> None:
    first = chat(client, tool_choice="required", temperature=0.0, max_tokens=200).choices[0].message
    messages = [*MESSAGES, first.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"} for call in first.tool_calls]
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, temperature=0.0,
                                            max_tokens=8)
    assert result.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert result.usage.prompt_tokens > chat(client, tool_choice="none", max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_impossible_tool_requests_are_a_400(http: httpx.Client, body: dict, param: str) -> None:
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)
