"""Wire constraints -> the engine's `StructuredOutputsParams`: OpenAI's `response_format` (chat,
completions, and the Responses API's `text.format`) and vLLM's `structured_outputs`.

Owns the mapping and its 400s (two constraints at once, a malformed one). Whether a schema or
grammar compiles is the engine's check, made at admission (`server.generation` maps it to a 400 with
the grammar engine's message). No HTTP beyond raising `InvalidParameterError`.
"""

from __future__ import annotations

from megalodon_infer.sample.params import StructuredOutputsParams
from server.errors import InvalidParameterError
from server.protocol_tools import ResponseFormat, StructuredOutputsRequest


def constraint_of(response_format: ResponseFormat | None, structured_outputs: StructuredOutputsRequest | None,
                  *, format_param: str = "response_format") -> StructuredOutputsParams | None:
    """The constraint a request asks for (None: plain text).

    `response_format` `json_object` is any JSON object; `json_schema` is JSON its schema validates,
    `strict: true` refusing schemas that use keywords the grammar engine does not implement
    (non-strict ignores those keywords, as OpenAI's non-strict mode promises no exact adherence).
    vLLM's `structured_outputs.json` is always strict.
    """
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and structured_outputs is not None:
        raise InvalidParameterError(f"Give either {format_param} or structured_outputs, not both.",
                                    param="structured_outputs")
    if wants_format:
        assert response_format is not None
        return _from_response_format(response_format, format_param)
    if structured_outputs is not None:
        return _from_structured_outputs(structured_outputs)
    return None


def _from_response_format(response_format: ResponseFormat, param: str) -> StructuredOutputsParams:
    try:
        if response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        spec = response_format.json_schema
        assert spec is not None and spec.json_schema is not None  # the wire type checks it
        return StructuredOutputsParams(json=spec.json_schema, lenient=not spec.strict)
    except ValueError as exc:
        raise InvalidParameterError(str(exc), param=param) from None


def _from_structured_outputs(request: StructuredOutputsRequest) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(
            json=request.json_schema, json_object=bool(request.json_object), regex=request.regex,
            choice=tuple(request.choice) if request.choice is not None else None, grammar=request.grammar)
    except ValueError as exc:
        raise InvalidParameterError(str(exc), param="structured_outputs") from None


def constraint_param(response_format: ResponseFormat | None, structured_outputs: StructuredOutputsRequest | None,
                     format_param: str = "response_format") -> str:
    """The field an invalid constraint is reported under."""
    return "structured_outputs" if structured_outputs is not None else format_param
