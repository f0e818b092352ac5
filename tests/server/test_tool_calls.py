"""Tool calls without a server: the plan for each tool_choice, and the incremental parse of answers.

The parse is what both the stream and the whole answer are built from, so the checks are that any
split of the text gives the same content and calls, and what the openai SDK would accumulate from
the deltas equals the final calls.
"""

from __future__ import annotations

import json

import pytest

from server.errors import InvalidParameterError
from server.tool_calls import FunctionSpec, plan_tools, tool_call_grammar
from server.tool_parser import ToolCallParser

WEATHER = FunctionSpec("get_weather", "Weather of a city",
                       {"type": "object", "properties": {"city": {"type": "string"}}})
CLOCK = FunctionSpec("get_time")
ANSWER = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", '
          '"days": [1, {"n": 2}]}}\n</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>\n')


def parse(pieces: list[str], max_calls: int | None = None) -> tuple[str, dict[int, dict], list[tuple[str, str]]]:
    """Content, the calls as the SDK accumulates deltas (by index), and the parser's own calls."""
    parser = ToolCallParser(max_calls, new_id=iter(f"call_{i}" for i in range(9)).__next__)
    content, accumulated = "", {}
    deltas = [parser.push(piece) for piece in pieces] + [parser.finish()]
    for delta in deltas:
        content += delta.content
        for call in delta.calls:
            entry = accumulated.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = entry["id"] or call.id
            entry["name"] = entry["name"] or call.name
            entry["arguments"] += call.arguments
    return content, accumulated, [(c.name, c.arguments) for c in parser.calls]


def test_any_split_gives_the_same_content_and_calls() -> None:
    whole = parse([ANSWER])
    content, accumulated, calls = whole
    assert content == "Let me look."
    assert calls == [("get_weather", '{"city": "Pa\\"ris}", "days": [1, {"n": 2}]}'), ("get_time", "{}")]
    assert [(c["id"], c["name"], c["arguments"]) for c in accumulated.values()] == [
        (f"call_{i}", name, arguments) for i, (name, arguments) in enumerate(calls)]
    assert json.loads(calls[0][1])["city"] == 'Pa"ris}'
    for size in (1, 2, 3, 5, 11):
        assert parse([ANSWER[i:i + size] for i in range(0, len(ANSWER), size)]) == whole, size


def test_text_without_calls_is_content_exactly() -> None:
    for text in ("Plain <tool but no call.\n\n", "a < b and <tool_call", "  spaced  "):
        assert parse([text]) == (text, {}, [])
        assert parse(list(text)) == (text, {}, [])


def test_blocks_that_are_not_calls_stay_content_and_extra_calls_are_dropped() -> None:
    assert parse(["x<tool_call>\nnot json\n</tool_call> y"])[0] == "x<tool_call>\nnot json\n</tool_call> y"
    assert parse([ANSWER], max_calls=1)[2] == [parse([ANSWER])[2][0]]
    # an answer cut off inside a call keeps what was read of it
    cut = ANSWER[:ANSWER.index('"days"')]
    assert parse([cut])[2] == [("get_weather", '{"city": "Pa\\"ris}", ')]


def test_plans_follow_tool_choice() -> None:
    assert plan_tools([], None, True).template_tools is None
    auto = plan_tools([WEATHER, CLOCK], None, True)
    assert auto.parse and auto.constraint is None and len(auto.template_tools) == 2
    assert not plan_tools([WEATHER], "none", True).parse
    required = plan_tools([WEATHER, CLOCK], "required", False)
    assert required.constraint is not None and required.max_calls == 1
    named = plan_tools([WEATHER, CLOCK], "get_time", True)
    assert '"const": "get_time"' in named.constraint.grammar and "get_weather" not in named.constraint.grammar
    # a function without parameters takes an empty object
    assert CLOCK.template_entry()["function"]["parameters"] == {"type": "object", "properties": {},
                                                               "additionalProperties": False}


@pytest.mark.parametrize("functions, choice, match", [
    ([], "required", "needs at least one tool"),
    ([WEATHER], "get_time", "not in tools"),
    ([WEATHER, WEATHER], "auto", "distinct"),
])
def test_impossible_tool_choices_are_refused(functions, choice, match) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        plan_tools(functions, choice, True)


def test_the_grammar_repeats_calls_only_when_parallel() -> None:
    assert "tool_call)*" in tool_call_grammar([WEATHER], parallel=True)
    assert "tool_call)*" not in tool_call_grammar([WEATHER], parallel=False)
