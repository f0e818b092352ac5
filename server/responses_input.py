"""Responses API input -> chat messages: the conversation the chat template renders.

Owns reading `input` (a string, or items: messages with text parts, `function_call` and
`function_call_output` items) and the tools of a request. A user message is
`{"role": "user", "content": str}`; `developer` is the system role; function calls join the
assistant message before them as its `tool_calls`; a call's output is a `tool` message. Images,
files, item references and built-in tools are refused with a 400 naming the item. No engine.
"""

from __future__ import annotations

from typing import Any

from server.errors import invalid_request
from server.prompts import check_unicode
from server.protocol_responses import FunctionTool, NamedFunctionChoice
from server.tool_calls import FunctionSpec

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_SKIPPED = frozenset({"reasoning"})  # carries nothing the prompt needs


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a request's `input`, in order."""
    if isinstance(value, str):
        check_unicode(value, "input")
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input.{index}"
        if not isinstance(item, dict):
            raise invalid_request(f"{param} must be an object.", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, param))
        elif kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", param)
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _text(item.get("output"), f"{param}.output")})
        elif kind not in _SKIPPED:
            raise invalid_request(f"{param}: input items of type {kind!r} are not supported.", param=param)
    if not messages:
        raise invalid_request("input holds no message.", param="input")
    return messages


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    given = item.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise invalid_request(f"{param}.role must be one of {sorted(_ROLES)}, got {item.get('role')!r}.",
                              param=f"{param}.role")
    return {"role": role, "content": _text(item.get("content"), f"{param}.content")}


def _function_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        raise invalid_request(f"{param}.arguments must be a string of JSON.", param=f"{param}.arguments")
    check_unicode(arguments, f"{param}.arguments")
    return {"id": _string(item, "call_id", param), "type": "function",
            "function": {"name": _string(item, "name", param), "arguments": arguments}}


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{param}.{key} must be a non-empty string.", param=f"{param}.{key}")
    check_unicode(value, f"{param}.{key}")
    return value


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        check_unicode(content, param)
        return content
    if not isinstance(content, list):
        raise invalid_request(f"{param} must be a string or a list of text parts.", param=param)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise invalid_request(f"{param}.{i}: only text parts are supported, got {kind!r}.", param=f"{param}.{i}")
        check_unicode(part["text"], f"{param}.{i}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def function_specs(tools: list[FunctionTool] | None) -> list[FunctionSpec]:
    specs = []
    for index, tool in enumerate(tools or []):
        if tool.name is None:
            raise invalid_request(f"tools.{index}.name is required.", param=f"tools.{index}.name")
        specs.append(FunctionSpec(tool.name, tool.description, tool.parameters, tool.strict))
    return specs


def tool_choice_name(choice: str | NamedFunctionChoice | None) -> str | None:
    return choice.name if isinstance(choice, NamedFunctionChoice) else choice
