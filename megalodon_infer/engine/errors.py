"""Typed engine errors; the server maps each to an HTTP status in one place."""

from __future__ import annotations


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; retry later (HTTP 429/503 with Retry-After)."""


class EngineShutdownError(RuntimeError):
    """The engine is draining or stopped and accepts no new requests (HTTP 503)."""


class ContextLengthError(ValueError):
    """prompt + max_tokens exceeds max_model_len (HTTP 400, vLLM's wording is built by the server)."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        total = num_prompt_tokens + (max_tokens or 0)
        super().__init__(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                         f"{total} tokens ({num_prompt_tokens} in the messages, {max_tokens or 0} in the "
                         "completion). Please reduce the length of the messages or completion.")
