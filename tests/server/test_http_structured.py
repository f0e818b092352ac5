"""Structured outputs through the official openai client against the real server.

The bundled model knows Python, not JSON schemas, and samples at temperature 0.8 here: every answer
is valid only because decoding is constrained. Also: regex and choice, streaming, n > 1 and
logprobs, exactness with a grammar that forbids nothing, and 400s for bad constraints.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from conftest import MODEL_NAME
from pydantic import BaseModel, Field

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]}},
     "required": ["name", "age", "role"], "additionalProperties": False},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                                   "y": {"type": "integer", "minimum": -50, "maximum": 50}},
                  "required": ["x", "y"], "additionalProperties": False},
        "label": {"enum": ["a", "b"]}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "object", "properties": {
        "ids": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1,
                "maxItems": 4},
        "ok": {"type": "boolean"}},
     "required": ["ids", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "level": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["tags", "level"], "additionalProperties": False},
        "note": {"type": ["string", "null"], "maxLength": 6}},
     "required": ["user", "note"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["x", "y", "z"]},
                                                                 "v": {"type": "integer", "minimum": 0,
                                                                       "maximum": 9}},
                                "required": ["k", "v"], "additionalProperties": False},
     "minItems": 1, "maxItems": 3},
]
PROMPTS = ["Describe a user as JSON.", "Give a point.", "List some ids.", "Tag a user.", "Key-value pairs."]


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def chat(client: openai.OpenAI, **kwargs: object):
    return client.chat.completions.create(model=MODEL_NAME, **kwargs)


@pytest.mark.slow
def test_fifty_json_schema_answers_at_temperature_0_8_all_parse_and_validate(client: openai.OpenAI) -> None:
    def ask(i: int) -> tuple[dict, str, str]:
        schema = SCHEMAS[i % len(SCHEMAS)]
        result = chat(client, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], temperature=0.8,
                      seed=1000 + i, max_tokens=160, response_format=json_schema_format(schema))
        choice = result.choices[0]
        return schema, choice.message.content, choice.finish_reason

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(ask, range(50)))
    for schema, content, finish_reason in answers:
        assert finish_reason == "stop", content
        jsonschema.validate(json.loads(content), schema)
    assert len({content for _, content, _ in answers}) > 10  # sampled, not one memorized answer


def test_the_sdk_parse_helper_gets_a_validated_model(client: openai.OpenAI) -> None:
    class Item(BaseModel):
        name: str = Field(max_length=6)
        count: int = Field(ge=0, le=9)
        colour: str = Field(json_schema_extra={"enum": ["red", "blue"]})

    result = client.chat.completions.parse(model=MODEL_NAME, messages=[{"role": "user", "content": "An item"}],
                                           temperature=0.8, seed=5, max_tokens=80, response_format=Item)
    item = result.choices[0].message.parsed
    assert isinstance(item, Item) and item.colour in ("red", "blue")


def test_regex_choice_and_json_object_are_honoured_with_n_and_logprobs(client: openai.OpenAI) -> None:
    pattern = r"[a-f]{3}-[0-9]{2,4}"
    result = client.completions.create(model=MODEL_NAME, prompt="code = ", max_tokens=20, temperature=0.8, seed=2,
                                       n=3, logprobs=2, extra_body={"structured_outputs": {"regex": pattern}})
    import re

    for choice in result.choices:
        assert re.fullmatch(pattern, choice.text) and choice.finish_reason == "stop"
        assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) > 0
    picked = chat(client, messages=[{"role": "user", "content": "yes or no?"}], temperature=0.8, seed=3, n=2,
                  max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert all(c.message.content in ("yes", "no", "maybe") for c in picked.choices)
    obj = chat(client, messages=[{"role": "user", "content": "json"}], temperature=0.8, seed=4, max_tokens=120,
               response_format={"type": "json_object"}, stop=["\n\n\n"])
    if obj.choices[0].finish_reason == "stop":  # an unbounded object may run into max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_a_streamed_constrained_answer_equals_the_whole_one(client: openai.OpenAI) -> None:
    kwargs = dict(messages=[{"role": "user", "content": "a point"}], temperature=0.8, seed=21, max_tokens=80,
                  response_format=json_schema_format(SCHEMAS[1]))
    whole = chat(client, **kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chat(client, stream=True, **kwargs)
                       if chunk.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SCHEMAS[1])


def token_ids(choice) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]


def test_a_grammar_admitting_every_token_gives_the_unconstrained_tokens(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt="def parse(text):\n", max_tokens=24, temperature=0.8, seed=8, n=2,
                  logprobs=1)
    # No ignore_eos: a sampled EOS completes the grammar (the request stops, as it must once the
    # grammar is done) while an unconstrained ignore_eos request would go on past it.
    free = client.completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True})
    constrained = client.completions.create(**kwargs, extra_body={
        "return_tokens_as_token_ids": True, "structured_outputs": {"grammar": "start: <[*]>*"}})
    assert [token_ids(c) for c in constrained.choices] == [token_ids(c) for c in free.choices]
    assert [c.finish_reason for c in constrained.choices] == [c.finish_reason for c in free.choices]
    assert [c.logprobs.token_logprobs for c in constrained.choices] == [c.logprobs.token_logprobs
                                                                      for c in free.choices]


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": json_schema_format({"type": "object", "properties": {"a": {"type": "wat"}}})},
     "response_format", "Invalid type"),
    ({"response_format": json_schema_format({"type": "array", "uniqueItems": True}, strict=True)},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs", "grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
])
def test_bad_constraints_are_a_400_in_openai_shape(http: httpx.Client, body: dict, param: str, message: str) -> None:
    response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and message in error["message"]
    assert error["param"] is not None and error["param"].startswith(param)
    # a non-strict schema with an unimplemented keyword is served (the keyword is ignored)
    lenient = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
        "response_format": json_schema_format({"type": "array", "uniqueItems": True}, strict=False)})
    assert lenient.status_code == 200
