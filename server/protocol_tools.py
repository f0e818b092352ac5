"""Wire types of structured outputs and tool calling, shared by chat, completions and responses.

OpenAI's `response_format` and function tools, vLLM's `structured_outputs`, and the tool calls a
chat answer carries (whole, or as stream deltas the openai SDK accumulates by `index`). Pydantic
only, like `server.protocol`: no torch, no engine; `server.structured` and `server.tool_calls` turn
these into engine settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

# OpenAI's rule for function names (they appear in prompts and in the tool-call grammar).
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"


class _Tolerant(BaseModel):
    """Unknown fields are kept, never rejected (OpenAI adds fields; clients send them)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class JsonSchemaSpec(_Tolerant):
    """`response_format.json_schema`: the schema, and whether it must be honoured exactly (`strict`;
    a schema using keywords the grammar engine lacks is then refused, instead of those keywords
    being ignored)."""

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Tolerant):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError('response_format of type "json_schema" needs json_schema.schema')
        return self


class StructuredOutputsRequest(_Tolerant):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, a regex, a choice of strings, a
    grammar (llguidance Lark or GBNF), or `json_object`."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDefinition(_Tolerant):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(_Tolerant):
    """A chat `tools` entry. Only function tools exist in chat completions."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Tolerant):
    name: str


class NamedToolChoice(_Tolerant):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`: call exactly this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    """A tool call of an answer (and, in a request, of an earlier assistant message)."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _DropsNulls(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaFunctionCall(_DropsNulls):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropsNulls):
    """One streamed piece of a tool call: the first piece of call `index` has its id, type and name
    (and empty arguments); the next ones append to `function.arguments`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
