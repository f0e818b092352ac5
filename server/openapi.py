"""The OpenAPI document, made to say what the server sends.

FastAPI documents a 422 validation error and JSON everywhere by default; this server answers bad
input with 400 in OpenAI's error shape, streams `text/event-stream`, serves Prometheus text on
/metrics, and sends 401/404/408/413/429/503 from its middlewares. Owns the per-route `responses`
tables and the clean-up of the generated document. Wire types only: no engine.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.protocol import ErrorResponse

_ERROR_DESCRIPTIONS = {
    400: "Invalid request (OpenAI's error shape)",
    401: "Missing or wrong API key",
    404: "Unknown model, session or stored response",
    408: "The request's headers or body arrived too slowly",
    413: "Request body over --max-request-bytes",
    429: "Too many requests waiting; retry after Retry-After seconds",
    500: "Internal error",
    503: "Loading, draining or shut down; retry after Retry-After seconds",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses` entries for these error statuses (every route can also get 401, 408, 413, 500)."""
    wanted = sorted({*statuses, 401, 408, 413, 500})
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in wanted}


def json_or_stream(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is `model` as JSON, or an SSE stream of its chunks when the body asks to stream."""
    return {200: {"model": model, "description": "The response, or with `stream: true` a server-sent event stream",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


PLAIN_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}}


def install(app: FastAPI) -> None:
    """Generate the document once, without FastAPI's 422 entries (this server answers 400)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
