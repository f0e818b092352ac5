"""The chat template with tools, and conversations continued from their exact token history.

What tool calling and the Responses API rely on: the default template's documented tool-call format,
special-token text in tool definitions and calls staying text, and `encode_chat_continuation`
producing exactly the ids the whole conversation would have, turn after turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megalodon_infer.tokenization.tokenizer import Tokenizer
from tests.tokenizer.conftest import CHAT_SPECIAL_TOKENS

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather, no </s> here",
                                           "parameters": PARAMETERS}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "<s>Paris"}'}}


def test_default_template_renders_tools_calls_and_results(tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "function": {
                    "name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS)
    system, rest = text.split("</s><|user|>", 1)
    assert system.startswith("<s><|system|>\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in system  # one JSON object per tool, as written (no HTML escapes)
    assert ('<|assistant|>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "<s>Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call></s>') in rest
    assert rest.endswith("<|tool|>\nsunny</s><|assistant|>\n")
    # without tools the layout is the plain one
    assert tokenizer.apply_chat_template(messages[:2]) == "<s><|system|>\nBe brief.</s><|user|>\nWeather?</s>" \
        "<|assistant|>\n"


def test_special_token_text_in_tools_and_calls_stays_text(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False, tools=TOOLS)
    # BOS once (the template's), EOS only where the template closes turns: system, user, assistant
    assert ids.count(tokenizer.bos_id) == 1 and ids.count(tokenizer.eos_id) == 3
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    assert "no </s> here" in decoded and '"<s>Paris"' in decoded


def conversation_turns() -> list[tuple[list[dict], str]]:
    """(new messages, reply) per turn: text, a tool call and its result, text again."""
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    return [([{"role": "user", "content": "Hi there"}], "Hello! How can I help?"),
            ([{"role": "user", "content": "Weather in Oslo? </s> ignore"}], call_text),
            ([{"role": "tool", "tool_call_id": "c", "content": "cold"}], "It is cold."),
            ([{"role": "user", "content": "Thanks"}], "You're welcome.")]


def reply_message(reply: str) -> dict:
    if reply.startswith("<tool_call>"):
        call = json.loads(reply.split("\n")[1])
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": call["name"],
                                                         "arguments": json.dumps(call["arguments"])}}]}
    return {"role": "assistant", "content": reply}


@pytest.mark.parametrize("legacy", [True, False])
def test_a_continued_conversation_equals_the_whole_conversation(model_file: Path, legacy: bool) -> None:
    """Turn by turn, history (prompt + the reply's ids + EOS) + continuation is exactly the encoding
    of the whole conversation, when each reply was generated as its canonical ids."""
    tokenizer = Tokenizer(model_file, legacy=legacy)
    system = [{"role": "system", "content": "Be brief."}]
    messages: list[dict] = []
    history: list[int] = []
    for new, reply in conversation_turns():
        if not history:
            prompt = tokenizer.encode_chat(system + new, tools=TOOLS)
        else:
            prompt = history + tokenizer.encode_chat_continuation(system + messages, new, history_ids=history,
                                                                  tools=TOOLS)
        messages_before_reply = messages + new
        assert prompt == tokenizer.encode_chat(system + messages_before_reply, tools=TOOLS)
        history = prompt + tokenizer.encode_continuation(reply) + [tokenizer.eos_id]
        messages = messages_before_reply + [reply_message(reply)]


def test_a_reply_cut_short_gets_the_turns_closing(tokenizer: Tokenizer) -> None:
    """A reply that ended without EOS (length): the continuation starts with the template's closing."""
    first = [{"role": "user", "content": "Count"}]
    history = tokenizer.encode_chat(first) + tokenizer.encode_continuation("1 2 3")
    later = [{"role": "user", "content": "more"}]
    continuation = tokenizer.encode_chat_continuation(first, later, history_ids=history)
    assert continuation[0] == tokenizer.eos_id
    assert history + continuation == tokenizer.encode_chat(first + [{"role": "assistant", "content": "1 2 3"}] + later)


def test_a_template_that_rewrites_history_cannot_be_continued(tmp_path: Path, trained_model_file: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(trained_model_file.read_bytes())
    # renders only the last message: the conversation is not a growing text
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"additional_special_tokens": CHAT_SPECIAL_TOKENS}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer is not None
    history = tokenizer.encode_chat([{"role": "user", "content": "a"}]) + [tokenizer.eos_id]
    assert tokenizer.encode_chat_continuation([{"role": "user", "content": "a"}],
                                              [{"role": "user", "content": "b"}], history_ids=history) is None
