"""Server-sent-event framing for streamed completions, in vLLM's and OpenAI's format.

Owns the bytes on the wire only: `data: <json>\\n\\n` events, the `[DONE]` terminator, comment
keep-alives and the in-stream error event. Knows nothing of engines or of which chunks to send.
"""

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from server.errors import to_openai_error

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"
# Lines starting with ':' are comments: SSE clients (openai-python, vllm bench) skip them, but they
# keep proxies and idle timeouts from cutting a stream during a long prefill.
SSE_KEEPALIVE = b": keep-alive\n\n"


def sse_event(payload: BaseModel | Mapping[str, Any] | str) -> bytes:
    """Frame one event. A model or mapping is JSON-encoded; a string is taken as JSON already.

    A payload with line breaks is split into several `data:` lines, which SSE clients join back
    with newlines, so the event stays one event.
    """
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    elif isinstance(payload, str):
        text = payload
    else:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    lines = "".join(f"data: {line}\n" for line in text.split("\n"))
    return f"{lines}\n".encode()


def sse_error_event(exc: BaseException) -> bytes:
    """The event for an error after the stream has started: `data: {"error": {...}}`.

    Uses the same mapping as the HTTP handlers (unknown exceptions are reported without details).
    Send `SSE_DONE` after it, as vLLM does; openai-python raises `APIError` on seeing it.
    """
    return sse_event(to_openai_error(exc).to_body())


def sse_headers() -> dict[str, str]:
    """Headers for a streaming response (a fresh dict, safe to extend)."""
    # X-Accel-Buffering stops nginx from buffering the stream; no-cache stops intermediaries
    # from storing or coalescing it.
    return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
