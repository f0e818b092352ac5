"""Wire types of the endpoints beyond OpenAI's: vLLM's tokenize/detokenize/tokenizer_info, and our
sessions. Pydantic only, like `server.protocol`: no torch, no engine.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from server.protocol import ChatCompletionMessageParam, _RequestModel


class TokenizeCompletionRequest(_RequestModel):
    """`POST /tokenize` with a plain prompt (vLLM's shape; lm-eval's remote tokenizer uses it)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_RequestModel):
    """`POST /tokenize` with chat messages, rendered through the chat template first."""

    model: str | None = None
    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    return_token_strs: bool = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """`GET /tokenizer_info`: lm-eval requires `eos_token` to be present."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int | None = None


class SessionSaveRequest(BaseModel):
    """Save the cached state of a conversation under `name`. The conversation is given as token ids
    (`prompt`, exact), text (`prompt`), or chat `messages` rendered without a generation prompt; the
    longest cached state it begins with is saved."""

    model_config = ConfigDict(extra="allow")

    name: str
    model: str | None = None
    prompt: str | list[Annotated[int, Field(ge=0)]] | None = None
    messages: list[ChatCompletionMessageParam] | None = None
    add_special_tokens: bool = True


class SessionLoadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    model: str | None = None


class SessionResponse(BaseModel):
    name: str
    num_tokens: int  # tokens the saved or restored state covers
    tenant: str | None = None  # the key's tenant that owns it (the admin key names it as TENANT/NAME)
