"""The Responses API through the official openai client: conversations that resume from their state,
the typed event stream, retrieve and delete, tenants and 404s, structured output and tools, and a
conversation that survives a restart (with --session-dir)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import API_KEYS, MODEL_NAME
from fastapi.testclient import TestClient

from server.app import build_app
from server.settings import ServerSettings
from tests.harness import ServerProcess, wait_until

INSTRUCTIONS = "You write short Python."
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "tag": {"enum": ["a", "b"]}},
         "required": ["x", "tag"], "additionalProperties": False}
TOKEN_IDS = {"return_token_ids": True}


def create(client: openai.OpenAI, **kwargs: object):
    return client.responses.create(model=MODEL_NAME, instructions=INSTRUCTIONS, **kwargs)


def token_ids(choice) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]


def whole_history_tokens(client: openai.OpenAI, prompt_ids: list[int], max_tokens: int,
                         constraint: dict | None) -> tuple[list[int], int]:
    """The continuation of `prompt_ids` computed from scratch (a cache namespace nothing else uses)."""
    result = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=max_tokens, temperature=0,
                                       logprobs=0, extra_body={"return_tokens_as_token_ids": True,
                                                               "cache_salt": uuid.uuid4().hex, **(constraint or {})})
    return token_ids(result.choices[0]), result.usage.prompt_tokens_details.cached_tokens


@pytest.mark.slow
def test_a_five_turn_chain_resumes_from_the_state_and_equals_the_whole_history(client: openai.OpenAI) -> None:
    """Every turn after the first finds the previous turn's state: its cached tokens are the whole
    history but the last generated token (sampled, never read: it opens the new input), and it
    generates exactly what the whole history sent at once, computed from scratch, generates."""
    turns, previous = [], None
    # a namespace of its own: another test's cached states (a 1-token prompt's, say) cannot give turn 1 a hit
    extra_body = {**TOKEN_IDS, "cache_salt": uuid.uuid4().hex}
    for k in range(5):
        # odd turns end with the EOS their complete grammar forces, even ones at max_output_tokens
        constrained = {"text": {"format": {"type": "json_schema", "name": "p", "schema": POINT, "strict": True}}}
        response = create(client, input=f"Step {k}: print a number.", max_output_tokens=24, temperature=0,
                          previous_response_id=previous, extra_body=extra_body, **(constrained if k % 2 else {}))
        if k % 2:
            jsonschema.validate(json.loads(response.output_text), POINT)
        turns.append(response)
        previous = response.id
    assert turns[0].usage.input_tokens_details.cached_tokens == 0
    for before, after in zip(turns, turns[1:], strict=False):
        history = before.prompt_token_ids + before.output_token_ids
        assert after.prompt_token_ids[:len(history)] == history
        assert after.usage.input_tokens_details.cached_tokens == len(history) - 1
        assert after.usage.input_tokens == len(after.prompt_token_ids) > len(history)
    schema_format = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT,
                                                                                "strict": True}}}
    for k, response in enumerate(turns):
        expected, cached = whole_history_tokens(client, response.prompt_token_ids, len(response.output_token_ids),
                                                schema_format if k % 2 else None)
        assert cached == 0 and expected == response.output_token_ids


def test_the_event_stream_works_with_the_sdk_unmodified(client: openai.OpenAI) -> None:
    events = list(create(client, input="Write a loop.", max_output_tokens=10, temperature=0, stream=True,
                         extra_body={"ignore_eos": True}))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # max_output_tokens cut it
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == final.output_text and final.usage.output_tokens == 10
    assert final.incomplete_details.reason == "max_output_tokens"
    # a streamed response is stored like any other, and continues
    assert client.responses.retrieve(final.id).output_text == text
    follow = create(client, input="Again.", max_output_tokens=2, previous_response_id=final.id, temperature=0)
    assert follow.usage.input_tokens_details.cached_tokens == final.usage.input_tokens + 10 - 1
    # the SDK's accumulating helper, on a response that completes (a choice ends it with EOS)
    with client.responses.stream(model=MODEL_NAME, input="yes or no?", max_output_tokens=8,
                                 extra_body={"structured_outputs": {"choice": ["yes", "no"]}}) as stream:
        completed = stream.get_final_response()
    assert completed.status == "completed" and completed.output_text in ("yes", "no")


def test_retrieve_delete_and_the_ids_nobody_may_use(client: openai.OpenAI, server: ServerProcess) -> None:
    response = create(client, input="Hi", max_output_tokens=3)
    assert client.responses.retrieve(response.id).output_text == response.output_text
    other_tenant = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEYS[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other_tenant.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        other_tenant.responses.create(model=MODEL_NAME, input="x", previous_response_id=response.id)
    assert unknown.value.body["param"] == "previous_response_id"
    client.responses.delete(response.id)
    for call in (lambda: client.responses.retrieve(response.id),
                 lambda: create(client, input="x", previous_response_id=response.id),
                 lambda: client.responses.delete(response.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    unstored = create(client, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_tools_and_their_results_in_a_conversation(client: openai.OpenAI) -> None:
    weather = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 5}},
               "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "name": "get_weather", "parameters": weather, "strict": True}]
    response = create(client, input="Weather in Oslo?", tools=tools, tool_choice="required",
                      parallel_tool_calls=False, temperature=0.8, max_output_tokens=60, extra_body=TOKEN_IDS)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), weather)
    result = create(client, previous_response_id=response.id, tools=tools, max_output_tokens=4, temperature=0,
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "cold"}],
                    extra_body=TOKEN_IDS)
    history = response.prompt_token_ids + response.output_token_ids
    assert result.prompt_token_ids[:len(history)] == history
    assert result.usage.input_tokens_details.cached_tokens == len(history) - 1


def test_changed_instructions_re_render_the_conversation(client: openai.OpenAI) -> None:
    first = create(client, input="One.", max_output_tokens=4, temperature=0)
    second = client.responses.create(model=MODEL_NAME, instructions="Different.", input="Two.",
                                     previous_response_id=first.id, max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens_details.cached_tokens < first.usage.input_tokens


@pytest.mark.parametrize("body, param", [
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "wat"}}}}, "text.format"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_requests_are_a_400(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**{"model": MODEL_NAME, "input": "x", "max_output_tokens": 2, **body})
    assert error.value.body["param"].startswith(param)


@contextlib.contextmanager
def in_process_server(model_dir: Path, session_dir: Path) -> Iterator[openai.OpenAI]:
    """The app in this process (lifespan included: startup loads the model, exit drains the store's
    writes and stops the engine), with the official client on top."""
    settings = ServerSettings(model=model_dir, served_model_name=MODEL_NAME, session_dir=session_dir,
                              max_num_seqs=2, torch_threads=1)
    with TestClient(build_app(settings)) as http:
        assert wait_until(lambda: http.get("/health").status_code == 200, timeout_s=120)
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.mark.slow
def test_a_conversation_survives_a_restart(model_dir: Path, tmp_path: Path) -> None:
    """The stored response and its state are on disk: after a restart the next turn still resumes
    from the state (cached tokens) and generates what it generated before the restart."""
    turn = dict(model=MODEL_NAME, input="Next.", max_output_tokens=6, temperature=0, extra_body=TOKEN_IDS)
    with in_process_server(model_dir, tmp_path) as client:
        first = client.responses.create(model=MODEL_NAME, input="Start.", max_output_tokens=6, temperature=0,
                                        extra_body=TOKEN_IDS)
        expected = client.responses.create(previous_response_id=first.id, **turn)
    assert {p.suffix for p in tmp_path.glob("responses/*")} == {".json", ".safetensors"}
    with in_process_server(model_dir, tmp_path) as client:
        assert client.responses.retrieve(first.id).output_text == first.output_text
        resumed = client.responses.create(previous_response_id=first.id, **turn)
    history = first.prompt_token_ids + first.output_token_ids
    assert resumed.usage.input_tokens_details.cached_tokens == len(history) - 1
    assert resumed.prompt_token_ids == expected.prompt_token_ids
    assert resumed.output_token_ids == expected.output_token_ids
