"""Chat templates: the default template (tools included), compiling Jinja2 templates as HF does, and
holding special-token text aside while a template renders.

Owns the text layout of a conversation: messages (with tool calls and tool results), tool
definitions, and which rendered text is a continuation of which. Knows nothing of token ids: the
tokenizer encodes what is rendered here (`tokenizer.Tokenizer.encode_chat`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# NOTE: the default chat template, used when a model ships none. It is a plain-text layout in the
# style of Zephyr that needs no extra vocabulary, only the tokenizer's own BOS and EOS:
#
#     <s><|system|>\n{system}</s><|user|>\n{user}</s><|assistant|>\n
#
# Each message is `<|{role}|>\n{content}` closed by EOS, so a model that learned the layout ends
# its turn with EOS and generation stops there; `add_generation_prompt` appends the open assistant
# header. Every header directly follows a special token, so each turn is tokenized the same way
# wherever it sits. Any role name is accepted (a tool result is a `tool` message).
#
# Tools (HF's `tools` argument, OpenAI's function definitions) go into the system message, after
# its own text, one JSON object per line inside <tools></tools>. The assistant calls them in the
# reply text, one block per call, calls separated by a newline:
#
#     <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
#
# An assistant message's `tool_calls` render the same way after its content, so a conversation
# re-rendered from its messages reads as the model wrote it. Arguments given as a string (OpenAI's
# wire form) are written as they are; a mapping is written as compact JSON (`json.dumps`).
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% if tools %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] + '\\n\\n' %}"
    "{% endif %}"
    "{{ '<|system|>\\n' + ns.system + '# Tools\\n\\nYou can call these functions, each described by a JSON "
    "schema:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools>\\n\\nTo call functions, answer with one block per call:\\n<tool_call>\\n{\"name\": <function "
    "name>, \"arguments\": <the arguments as a JSON object>}\\n</tool_call>' + eos_token }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and tools and message['role'] == 'system') %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') }}"
    "{% for tool_call in message.get('tool_calls') or [] %}"
    "{% set fn = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Noncharacters (never valid in interchanged text) that stand in for special-token text found in a
# chat message while the template renders, so that text stays text (`protect`).
PROTECTORS = [chr(c) for c in range(0xFDD0, 0xFDF0)] + [
    chr(plane * 0x10000 + c) for plane in range(17) for c in (0xFFFE, 0xFFFF) if plane * 0x10000 + c != 0x10FFFF]
_PROTECTOR_SET = frozenset(PROTECTORS)
# Stands for the assistant's reply while a continuation is worked out (private-use characters).
_REPLY_MARK = "\ue000\ue001reply\ue002"


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    # HF's tojson: plain JSON, non-ASCII kept. Jinja's own escapes <, >, & and ' as \u003c..., which
    # would put `\u003ctool_call\u003e` in prompts, and ASCII-escapes the stand-ins of `protect`.
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template does not compile: {error}") from error


def render(template: jinja2.Template, messages: list[dict[str, Any]], add_generation_prompt: bool,
           context: Mapping[str, Any]) -> str:
    """`template` rendered over `messages`; raises ValueError for malformed messages or when the
    template rejects them. A message needs a string `role`, and a string `content` unless it is an
    assistant message with `tool_calls` (then None is allowed)."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and (isinstance(content, str) or (content is None and tool_calls))):
            raise ValueError(f"each message needs a string 'role' and 'content', got {message!r}.")
    try:
        return template.render(**context, messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template error: {error}") from error


def protect(value: Any, pattern: re.Pattern[str] | None, found: dict[str, str]) -> Any:
    """`value` (a message, a list of tools, any JSON-like structure) with every special-token text in
    its strings replaced by a stand-in; `found` collects special text -> stand-in. Raises ValueError
    for text that contains the stand-ins themselves."""
    if isinstance(value, str):
        if not _PROTECTOR_SET.isdisjoint(value):
            raise ValueError("message content contains Unicode noncharacters (U+FDD0-U+FDEF, U+xFFFE, U+xFFFF)")
        if pattern is None:
            return value
        for special in pattern.findall(value):
            if special not in found:
                if len(found) == len(PROTECTORS):
                    raise ValueError("too many different special-token texts in one conversation")
                found[special] = PROTECTORS[len(found)]
        return pattern.sub(lambda m: found[m.group(0)], value) if found else value
    if isinstance(value, dict):
        return {key: protect(item, pattern, found) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [protect(item, pattern, found) for item in value]
    return value


def continuation_text(template: jinja2.Template, messages: list[dict[str, Any]], new_messages: list[dict[str, Any]],
                      context: Mapping[str, Any]) -> str | None:
    """The text the template writes after the assistant's reply to `messages` and up to the next
    generation prompt, `new_messages` included: the reply's closing, the new turns, the open header.

    The reply itself is whatever the model generated after `render(messages, add_generation_prompt)`.
    None when the template does not render the conversation as a growing text (it rewrites earlier
    turns, or renders the reply's header differently from the generation prompt), so the caller
    re-renders the whole conversation instead.
    """
    if any(_REPLY_MARK in json.dumps(m, ensure_ascii=False) for m in [*messages, *new_messages]):
        return None
    reply = {"role": "assistant", "content": _REPLY_MARK}
    prompt = render(template, messages, True, context)
    closed = render(template, [*messages, reply], False, context)
    extended = render(template, [*messages, reply, *new_messages], True, context)
    if not closed.startswith(prompt + _REPLY_MARK) or not extended.startswith(closed):
        return None
    return closed[len(prompt) + len(_REPLY_MARK):] + extended[len(closed):]


def select_chat_template(template: Any) -> str | None:
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
