"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, in vLLM's shapes.

lm-eval's remote tokenizer uses all three (it probes `/tokenizer_info` for `eos_token`, then
tokenizes and detokenizes through the server). Owns nothing but those shapes: encoding and chat
templates are the tokenizer's and `server.prompts`'.
"""

from __future__ import annotations

from fastapi import Request

from server.prompts import chat_prompt, encode_text, off_loop
from server.protocol import ChatCompletionRequest
from server.protocol_extensions import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from server.state import get_state

TOKENIZER_CLASS = "SentencePieceTokenizer"


async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template."""
    state = get_state(request)
    state.check_model(body.model)
    state.require_engine()
    tokenizer = state.require_tokenizer("tokenizing")
    if isinstance(body, TokenizeChatRequest):
        chat = ChatCompletionRequest(
            messages=body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, chat_template_kwargs=body.chat_template_kwargs)
        tokens = (await chat_prompt(state, chat)).token_ids
    else:
        tokens = await off_loop(len(body.prompt), encode_text, tokenizer, body.prompt,
                                add_special_tokens=body.add_special_tokens, param="prompt")
    token_strs = [tokenizer.token_text(t) for t in tokens] if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens,
                            token_strs=token_strs)


async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of a list of token ids (400 for an id outside the vocabulary)."""
    state = get_state(request)
    state.check_model(body.model)
    state.require_engine()
    tokenizer = state.require_tokenizer("detokenizing")
    return DetokenizeResponse(prompt=await off_loop(len(body.tokens), tokenizer.decode, body.tokens))


async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    """The special tokens and chat template a remote-tokenizer client needs."""
    state = get_state(request)
    state.require_engine()
    tokenizer = state.require_tokenizer("tokenizer_info")
    return TokenizerInfoResponse(
        tokenizer_class=TOKENIZER_CLASS,
        eos_token=tokenizer.eos_token,
        bos_token=tokenizer.bos_token,
        pad_token=tokenizer.pad_token,
        chat_template=tokenizer.chat_template,
        model_max_length=state.max_model_len,
        vocab_size=tokenizer.vocab_size,
        add_bos_token=tokenizer.bos_id >= 0,
    )
