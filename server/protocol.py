"""OpenAI-compatible wire types: completions, chat completions, models, tokenize and errors.

Owns the JSON shape of every request and response body, plus the checks that are purely about the
wire (which fields and field combinations the API accepts). It must not import torch or the engine:
turning a request into engine settings is `server.convert`'s job, so wire format and engine
semantics can change separately.

Conventions:
- Unknown request fields are tolerated (vLLM does the same; clients send vendor extensions).
- A sampling knob left out, or sent as null, is None here and means "the engine's default".
- An explicit null on a field with a non-null default (`stream`, `echo`, ...) means that default,
  except `max_tokens`, where null means "as many as the context allows".
"""

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from server.protocol_tools import (
    ChatCompletionTool,
    DeltaToolCall,
    ResponseFormat,
    StructuredOutputsRequest,
    ToolCall,
    ToolChoice,
)

# The seed is a signed 64-bit integer downstream; bounds written out so this module needs no torch.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# -inf is not valid JSON; vLLM clamps logprobs to this value and clients expect it.
LOGPROB_FLOOR = -9999.0
# The OpenAI API caps chat `top_logprobs` at 20.
MAX_TOP_LOGPROBS = 20


def _invalid(message: str) -> PydanticCustomError:
    # A custom error keeps the message exactly as written (a plain ValueError gets "Value error, ").
    return PydanticCustomError("invalid_request", message)


def _one_error(expected: str) -> WrapValidator:
    """Collapse pydantic's one-error-per-union-member into a single readable error."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            raise PydanticCustomError(
                "invalid_type", "Input should be {expected}", {"expected": expected}
            ) from exc

    return WrapValidator(validate)


def _check_prompt(value: str | list[str] | list[int] | list[list[int]]) -> Any:
    if isinstance(value, str):
        return value
    if not value:
        raise _invalid("prompt must not be an empty list")
    for item in value:
        if isinstance(item, list) and not item:
            raise _invalid("prompt must not contain an empty list of token ids")
        ids = item if isinstance(item, list) else [item]
        if any(isinstance(t, int) and t < 0 for t in ids):
            raise _invalid("prompt token ids must be non-negative")
    return value


def _clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


Prompt = Annotated[
    str | list[str] | list[int] | list[list[int]],
    _one_error("a string, a list of strings, a list of token ids or a list of token-id lists"),
    AfterValidator(_check_prompt),
]
Stop = Annotated[str | list[str] | None, _one_error("a string or a list of strings")]
Logprob = Annotated[float, AfterValidator(_clamp_logprob)]


class _RequestModel(BaseModel):
    """Base of request bodies: unknown fields are kept (readable in `model_extra`), never rejected."""

    model_config = ConfigDict(extra="allow")

    # Fields where an explicit null means something other than the field's default.
    _null_is_meaningful: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if not (
                value is None
                and key in fields
                and fields[key].default is not None
                and key not in cls._null_is_meaningful
            )
        }


class StreamOptions(_RequestModel):
    """`stream_options`. As in vLLM, sending the object turns usage on unless it says otherwise;
    an explicit `include_usage: null` reads as false."""

    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False

    _null_is_meaningful: ClassVar[frozenset[str]] = frozenset({"include_usage", "continuous_usage_stats"})


class _SamplingRequest(_RequestModel):
    """Fields shared by completions and chat completions (OpenAI's plus vLLM's extensions)."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    echo: bool = False
    # vLLM extensions that benchmark and eval clients send.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    # Structured outputs: OpenAI's field, or vLLM's (json, regex, choice, grammar).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise _invalid("stream_options can only be set when stream is true")
        return value


class CompletionRequest(_SamplingRequest):
    """Body of `POST /v1/completions`."""

    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True

    _null_is_meaningful: ClassVar[frozenset[str]] = frozenset({"max_tokens"})

    @field_validator("best_of")
    @classmethod
    def _only_best_of_one(cls, value: int | None) -> int | None:
        # Old clients always send best_of=1 (vLLM V0 habit); anything larger needs beam-like
        # search over candidates, which we do not do.
        if value is not None and value != 1:
            raise _invalid(f"best_of={value} is not supported; only best_of=1 (or null) is accepted")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise _invalid("suffix is not supported")
        return value


class ChatCompletionContentPartText(_RequestModel):
    """One `{"type": "text", "text": ...}` part of a message's content."""

    type: Literal["text"]
    text: str


def _only_text_parts(value: Any) -> Any:
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise PydanticCustomError(
                    "unsupported_content_part",
                    "Only text content parts are supported; got a part of type '{kind}'",
                    {"kind": str(kind)},
                )
    return value


# Validators run outside-in: the part-type check (last) runs before the union is tried.
MessageContent = Annotated[
    str | list[ChatCompletionContentPartText] | None,
    _one_error('a string or a list of {"type": "text", "text": ...} parts'),
    BeforeValidator(_only_text_parts),
]


class ChatCompletionMessageParam(_RequestModel):
    """One input message. `role` is free-form on purpose: the chat template decides what it accepts.
    An assistant message may carry the `tool_calls` it made; a `tool` message answers `tool_call_id`."""

    role: str
    content: MessageContent = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined with newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    tools: list[ChatCompletionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise _invalid("top_logprobs requires logprobs to be true")
        return value


def _random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts. `prompt_tokens_details.cached_tokens` reports prompt tokens served from a
    state checkpoint (our prefix-cache hits)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> "UsageInfo":
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )


class CompletionLogProbs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token (prompt tokens first when
    echoing; the first prompt token has no logprob, hence null)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    # vLLM extension: the stop string or stop token id that ended the choice, if any.
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionResponseStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(BaseModel):
    """One SSE chunk. The final usage chunk has `choices: []`; other chunks carry `usage: null`
    unless continuous usage stats were asked for."""

    id: str = Field(default_factory=lambda: _random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ChatCompletionLogProb(BaseModel):
    token: str
    logprob: Logprob = LOGPROB_FLOOR
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatMessage(BaseModel):
    """The assistant message of a non-streaming chat choice; `tool_calls` only when it made some
    (then `content` is null unless it also wrote text)."""

    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body = handler(self)
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)
        return body


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    """A streamed chat delta. Unset keys are left out of the JSON rather than sent as null, so a
    role-only chunk is `{"role": "assistant"}` and a content chunk is `{"content": "..."}`."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionResponseStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str = Field(default_factory=lambda: _random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One `/v1/models` entry. `root` is read by `vllm bench serve` as the tokenizer id."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "megalodon"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    # vLLM sends the HTTP status as an int; OpenAI-style string codes ("context_length_exceeded")
    # are used where clients branch on them.
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's nested error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo
