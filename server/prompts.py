"""Request -> prompt token ids and sampling settings, with the checks that need the tokenizer.

Owns how a completions `prompt` (string, strings, token ids, lists of token ids) and a chat
`messages` list become token ids, the context-length check with vLLM's wording, and the per-prompt
default for an open `max_tokens`. Knows nothing of the engine loop or of response shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megalodon_infer.sampling_params import SamplingParams
from megalodon_infer.tokenizer import Tokenizer
from server.convert import to_sampling_params
from server.errors import check_context_length, invalid_request
from server.protocol import ChatCompletionMessageParam, ChatCompletionRequest, CompletionRequest
from server.state import ServerState


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


def completion_prompts(state: ServerState, body: CompletionRequest) -> list[PromptInput]:
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
            ids = encode_text(tokenizer, item, add_special_tokens=body.add_special_tokens, param="prompt")
            prompts.append(PromptInput(ids, item))
        else:
            prompts.append(PromptInput([int(t) for t in item]))
    return prompts


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> PromptInput:
    """The chat messages rendered with the model's chat template, as token ids."""
    tokenizer = state.require_tokenizer("chat")
    messages = [_message_dict(i, message) for i, message in enumerate(body.messages)]
    kwargs = dict(body.chat_template_kwargs or {})
    if not body.continue_final_message:
        return PromptInput(tokenizer.encode_chat(messages, body.add_generation_prompt, **kwargs))
    if body.add_generation_prompt:
        raise invalid_request("continue_final_message and add_generation_prompt cannot both be true.",
                              param="continue_final_message")
    # The last message is left open for the model to continue: cut the rendering right after it.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    final = messages[-1]["content"]
    end = text.rfind(final) if final else -1
    if end >= 0:
        text = text[: end + len(final)]
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return PromptInput(tokenizer.encode(text, add_bos=not has_bos))


def _message_dict(index: int, message: ChatCompletionMessageParam) -> dict[str, Any]:
    content = message.text()
    check_unicode(content, f"messages.{index}.content")
    result: dict[str, Any] = {"role": message.role, "content": content}
    if message.name is not None:
        result["name"] = message.name
    return result


def sampling_params_for(
    body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], max_model_len: int
) -> SamplingParams:
    """Sampling settings for one prompt; a 400 (vLLM's context-length wording) when the prompt
    plus the requested output cannot fit in `max_model_len`."""
    if isinstance(body, ChatCompletionRequest):
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    else:
        requested = body.max_tokens
    check_context_length(num_prompt_tokens=len(prompt_ids), max_tokens=requested, max_model_len=max_model_len)
    return to_sampling_params(body, default_max_tokens=max(0, max_model_len - len(prompt_ids)))
