"""OpenAI-shaped errors, and the one place that maps exceptions to HTTP error responses.

Owns the error body (`{"error": {"message", "type", "param", "code"}}`), the status -> type names
(vLLM's, which are openai-python's exception class names), the context-length wording clients
parse with regexes, and the FastAPI handlers. Handlers and the SSE layer both go through
`to_openai_error`, so an error looks the same before and after a stream starts.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

# openai-python picks its exception class from the status; vLLM names the error type after it.
_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
# Statuses that clients retry (openai-python retries 429 and 5xx); always tell them when.
_RETRYABLE = frozenset({429, 503})
DEFAULT_RETRY_AFTER_S = 1
INTERNAL_ERROR_MESSAGE = "Internal server error."


def error_type_for(status: int) -> str:
    """The `type` string sent for an HTTP status."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


class OpenAIError(Exception):
    """An error answered to the client in OpenAI's shape.

    `code` defaults to the HTTP status (vLLM's convention); pass a string such as
    "context_length_exceeded" where clients branch on it. For 429 and 503 a `Retry-After` header
    is always sent (`retry_after` seconds, default 1).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: int | str | None = None,
        *,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type_for(status)
        self.param = param
        self.code = status if code is None else code
        self.headers = dict(headers or {})
        if status in _RETRYABLE:
            self.headers.setdefault("Retry-After", str(retry_after or DEFAULT_RETRY_AFTER_S))

    def to_body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_body().model_dump(), status_code=self.status, headers=self.headers)


class InvalidParameterError(ValueError):
    """A bad request value, with the offending wire field name (reported as `param`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def invalid_request(message: str, param: str | None = None, code: int | str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unauthorized(message: str = "Invalid or missing API key.") -> OpenAIError:
    return OpenAIError(401, message, headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> OpenAIError:
    """404 with vLLM's (and OpenAI's) wording for an unknown `model`."""
    return OpenAIError(404, f"The model `{model}` does not exist.", param="model")


def overloaded(
    message: str = "The server is overloaded; retry later.", retry_after: int = DEFAULT_RETRY_AFTER_S
) -> OpenAIError:
    return OpenAIError(429, message, retry_after=retry_after)


def service_unavailable(message: str, retry_after: int = DEFAULT_RETRY_AFTER_S) -> OpenAIError:
    return OpenAIError(503, message, retry_after=retry_after)


def context_length_message(*, max_model_len: int, num_prompt_tokens: int, max_tokens: int) -> str:
    """vLLM's wording for prompt + max_tokens over the limit. Clients parse it: keep it verbatim."""
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{max_tokens} output tokens and your prompt contains {num_prompt_tokens} input tokens, "
        f"for a total of {num_prompt_tokens + max_tokens} tokens. Please reduce the length of the "
        "input prompt or the number of requested output tokens."
    )


def prompt_too_long_message(*, max_model_len: int, num_prompt_tokens: int) -> str:
    """vLLM's wording for a prompt that alone exceeds the limit."""
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, your request has "
        f"{num_prompt_tokens} input tokens. Please reduce the length of the input messages."
    )


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map any exception to the error the client sees. Unknown exceptions become a 500 whose
    message reveals nothing about the server's internals."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestValidationError | ValidationError):
        return _from_validation_errors(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return OpenAIError(exc.status_code, str(exc.detail), headers=exc.headers)
    if isinstance(exc, ValueError):
        return invalid_request(str(exc), param=getattr(exc, "param", None))
    return OpenAIError(500, INTERNAL_ERROR_MESSAGE)


def _from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> OpenAIError:
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "could not be decoded")
            return invalid_request(f"Request body is not valid JSON: {detail}.")
    messages: list[str] = []
    first_param: str | None = None
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        if loc[:1] == ["body"]:
            loc = loc[1:]
        path = ".".join(loc)
        if first_param is None and path:
            first_param = path
        text = _describe(error, path)
        if text not in messages:
            messages.append(text)
    return invalid_request("; ".join(messages) or "Invalid request.", param=first_param)


def _describe(error: Mapping[str, Any], path: str) -> str:
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if path:
        return f"{path}: {msg}"
    if error.get("type") == "missing":
        return "Request body is required (a JSON object)."
    if isinstance(error.get("input"), bytes | str):
        # FastAPI hands over the raw body when the Content-Type is not JSON.
        return "Request body must be a JSON object sent with Content-Type: application/json."
    return f"Request body: {msg}"


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return to_openai_error(exc).to_response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every error raised while handling a request through `to_openai_error`.

    NOTE: Starlette re-raises an unhandled exception after the 500 response is sent, so the server
    log still gets the traceback while the client only sees a generic message.
    """
    for exc_type in (OpenAIError, RequestValidationError, StarletteHTTPException, ValueError, Exception):
        app.add_exception_handler(exc_type, _handle)
