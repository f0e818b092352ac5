"""Request -> prompt token ids and sampling settings, with the checks that need the tokenizer.

Owns how a completions `prompt` (string, strings, token ids, lists of token ids) and a chat
`messages` list become token ids. The context-length rule is the engine's (one place); this module
knows nothing of the engine loop or of response shapes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from megalodon_infer.sample.params import SamplingParams, StructuredOutputsParams
from megalodon_infer.tokenization.tokenizer import Tokenizer
from server.convert import to_sampling_params
from server.errors import invalid_request
from server.protocol import ChatCompletionMessageParam, ChatCompletionRequest, CompletionRequest
from server.state import ServerState

T = TypeVar("T")
# Text longer than this is tokenized (and decoded) in a worker thread: a few MB would otherwise hold
# the event loop, and every other request and /health with it, for seconds (sentencepiece releases
# the GIL while it works).
OFF_LOOP_CHARS = 16_384


async def off_loop(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, in a worker thread when `size` (characters or tokens) is large."""
    if size <= OFF_LOOP_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass(frozen=True)
class PromptInput:
    """One prompt: its token ids, and its text when the client sent text (echo repeats it)."""

    token_ids: list[int]
    text: str | None = None


def encode_text(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
    """Token ids of `text`; a 400 for text that is not valid Unicode (a lone surrogate)."""
    check_unicode(text, param)
    return tokenizer.encode(text, add_bos=add_special_tokens)


def check_unicode(text: str, param: str) -> None:
    # JSON may carry "\ud800" escapes; such a string cannot be encoded (or tokenized) as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_request(f"{param} is not valid Unicode text: it contains a lone surrogate.",
                              param=param) from None


async def completion_prompts(state: ServerState, body: CompletionRequest) -> list[PromptInput]:
    """One `PromptInput` per prompt of a completions request, in order."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    prompts = []
    for item in items:
        if isinstance(item, str):
            tokenizer = state.require_tokenizer("a text prompt")
            ids = await off_loop(len(item), encode_text, tokenizer, item, add_special_tokens=body.add_special_tokens,
                                 param="prompt")
            prompts.append(PromptInput(ids, item))
        else:
            prompts.append(PromptInput([int(t) for t in item]))
    return prompts


async def chat_prompt(state: ServerState, body: ChatCompletionRequest,
                      tools: list[dict[str, Any]] | None = None) -> PromptInput:
    """The chat messages rendered with the model's chat template (with `tools`, the function
    definitions, when the request offers any), as token ids."""
    tokenizer = state.require_tokenizer("chat")
    size = sum(len(message.text()) for message in body.messages)
    return await off_loop(size, _render_chat, tokenizer, body, tools)


def _render_chat(tokenizer: Tokenizer, body: ChatCompletionRequest, tools: list[dict[str, Any]] | None
                 ) -> PromptInput:
    messages = chat_messages(body.messages)
    if body.continue_final_message and body.add_generation_prompt:
        raise invalid_request("continue_final_message and add_generation_prompt cannot both be true.",
                              param="continue_final_message")
    kwargs = dict(body.chat_template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    return PromptInput(tokenizer.encode_chat(messages, body.add_generation_prompt, body.continue_final_message,
                                             **kwargs))


def chat_messages(messages: list[ChatCompletionMessageParam], param: str = "messages") -> list[dict[str, Any]]:
    """Wire messages as the chat template reads them (HF's message dicts)."""
    return [_message_dict(i, message, param) for i, message in enumerate(messages)]


def _message_dict(index: int, message: ChatCompletionMessageParam, param: str) -> dict[str, Any]:
    content = message.text()
    check_unicode(content, f"{param}.{index}.content")
    result: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        result["name"] = message.name
    if message.tool_calls:
        # OpenAI's null content beside tool calls stays null (templates test `if message.content`)
        result["content"] = content if message.content is not None else None
        result["tool_calls"] = [{"id": call.id, "type": "function",
                                 "function": {"name": call.function.name, "arguments": call.function.arguments}}
                                for call in message.tool_calls]
        check_unicode(json.dumps(result["tool_calls"], ensure_ascii=False), f"{param}.{index}.tool_calls")
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    return result


def sampling_params_for(body: CompletionRequest | ChatCompletionRequest,
                        tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    """Sampling settings for a request's prompts (the engine checks them against the context)."""
    return to_sampling_params(body, tool_constraint)
