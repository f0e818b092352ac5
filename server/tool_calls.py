"""Tool calling: which tools a request offers, whether the answer must call one, and the grammar that
makes its calls parse.

Owns `tool_choice` semantics for chat and the Responses API. The tools are rendered into the prompt
by the chat template (`megalodon_infer.tokenization.chat_template`, which documents the format the
model writes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks). With
`tool_choice` `required` or a named function the output is constrained to such blocks whose
`arguments` match the function's JSON schema, so they always parse and validate; with `auto` it is
free and parsed afterwards (`server.tool_parser`); with `none` nothing is parsed. No HTTP beyond
raising `InvalidParameterError`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megalodon_infer.sample.grammar import JSON_FORMAT
from megalodon_infer.sample.params import StructuredOutputsParams
from megalodon_infer.tokenization.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_SEPARATOR
from server.errors import InvalidParameterError

# `arguments` of a function declared without `parameters`: an empty object (OpenAI's meaning).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class FunctionSpec:
    """One function tool, whichever API declared it (chat nests it under `function`, Responses does not)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def template_entry(self) -> dict[str, Any]:
        """The tool as chat templates expect it (HF's `tools` argument: OpenAI's chat form)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters if self.parameters is not None else NO_PARAMETERS
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt, its decoding and its answer.

    `template_tools` go to the chat template (None: no tools); `constraint` forces the output to be
    tool calls (required or named); `parse` says whether the answer's tool calls are read out of the
    text; `max_calls` is 1 when `parallel_tool_calls` is false.
    """

    functions: tuple[FunctionSpec, ...] = ()
    template_tools: list[dict[str, Any]] | None = None
    constraint: StructuredOutputsParams | None = None
    parse: bool = False
    max_calls: int | None = None


NO_TOOLS = ToolPlan()


def plan_tools(functions: Sequence[FunctionSpec], tool_choice: str | None, parallel: bool) -> ToolPlan:
    """The plan for `functions` under `tool_choice`: "none", "auto", "required", or a function's name
    (None: "auto" with tools, "none" without). Raises InvalidParameterError for a choice the tools
    cannot satisfy."""
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidParameterError("tools must have distinct function names.", param="tools")
    choice = tool_choice or ("auto" if functions else "none")
    if not functions:
        if choice in ("none", "auto"):
            return NO_TOOLS
        raise InvalidParameterError(f'tool_choice "{choice}" needs at least one tool in tools.', param="tool_choice")
    template_tools = [f.template_entry() for f in functions]
    max_calls = None if parallel else 1
    if choice == "none":
        return ToolPlan(tuple(functions), template_tools)
    if choice == "auto":
        return ToolPlan(tuple(functions), template_tools, parse=True, max_calls=max_calls)
    chosen = list(functions) if choice == "required" else [f for f in functions if f.name == choice]
    if not chosen:
        raise InvalidParameterError(f"tool_choice names the function {choice!r}, which is not in tools.",
                                    param="tool_choice")
    constraint = StructuredOutputsParams(grammar=tool_call_grammar(chosen, parallel))
    return ToolPlan(tuple(functions), template_tools, constraint, parse=True, max_calls=max_calls)


def tool_call_grammar(functions: Sequence[FunctionSpec], parallel: bool) -> str:
    """An llguidance Lark grammar: one (or, when `parallel`, one or more newline-separated) tool-call
    blocks, each a JSON object `{"name": <one of the functions>, "arguments": <its schema>}`.

    NOTE: the whole block is grammar, so the model cannot write text around the calls; its JSON uses
    the template's separators (`JSON_FORMAT`), so the answer reads like a rendered tool call.
    """
    alternatives = [_call_schema(f) for f in functions]
    schema: dict[str, Any] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    # a non-strict function's schema may use keywords the engine lacks: ignore them rather than refuse
    schema = {**schema, "x-guidance": {**JSON_FORMAT, "lenient": not all(f.strict for f in functions)}}
    block = f"{json.dumps(TOOL_CALL_OPEN)} %json {json.dumps(schema)} {json.dumps(TOOL_CALL_CLOSE)}"
    repeat = f" ({json.dumps(TOOL_CALL_SEPARATOR)} tool_call)*" if parallel else ""
    return f"start: tool_call{repeat}\ntool_call: {block}\n"


def _call_schema(function: FunctionSpec) -> dict[str, Any]:
    parameters = function.parameters if function.parameters is not None else NO_PARAMETERS
    return {"type": "object", "properties": {"name": {"const": function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
