"""Recurrent-state endpoints: `/props` (what a request's state costs) and named sessions.

A session is a conversation's cached state written to disk under a name, restorable after a
restart into the prefix cache, so the next turn resumes without re-reading the history.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from megalodon_infer import request_state_bytes
from megalodon_infer.sessions import SessionError
from server.errors import OpenAIError, invalid_request
from server.prompts import chat_prompt, encode_text
from server.protocol import ChatCompletionRequest
from server.protocol_extensions import SessionLoadRequest, SessionResponse, SessionSaveRequest
from server.state import ServerState, get_state


async def props(request: Request) -> dict:
    """Chunk size, slots, bytes per slot and per snapshot, limits, prefix cache and kernel backend."""
    state = get_state(request)
    llm = state.require_llm_engine()
    cfg = llm.model.config
    cache = llm.prefix_cache
    kv_dtype, stat_dtype = llm.model.dtype, llm.model.stat_dtype
    return {
        "model": state.model_name,
        "chunk_size": cfg.chunk_size,
        "num_layers": cfg.num_layers,
        "dtype": str(llm.model.dtype).removeprefix("torch."),
        "device": str(llm.model.device),
        "decode_kernels": llm.model.decode_backend,
        "max_model_len": llm.config.max_model_len,
        "max_num_seqs": llm.config.max_num_seqs,
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "num_state_slots": llm.pool.num_slots,
        "bytes_per_slot": llm.pool.bytes_per_slot,
        "state_pool_bytes": llm.pool.total_bytes,
        "bytes_per_snapshot_at_chunk_boundary": request_state_bytes(cfg, kv_dtype, stat_dtype, num_kv=0),
        "bytes_per_request_worst_case": request_state_bytes(cfg, kv_dtype, stat_dtype),
        "prefix_cache": {
            "enabled": cache is not None,
            "device_bytes": llm.config.prefix_cache_bytes,
            "host_bytes": llm.config.prefix_cache_host_bytes,
            "stored_bytes": cache.stored_bytes() if cache is not None else 0,
            "entries": len(cache) if cache is not None else 0,
        },
        "sessions": state.settings.session_dir is not None,
    }


def _session_dir(state: ServerState):
    directory = state.settings.session_dir
    if directory is None:
        raise invalid_request("Sessions are off on this server: start it with --session-dir.")
    return directory


def _conversation_tokens(state: ServerState, body: SessionSaveRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request("Give the conversation as exactly one of 'prompt' or 'messages'.", param="prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=False)
        return chat_prompt(state, chat).token_ids
    if isinstance(body.prompt, str):
        tokenizer = state.require_tokenizer("a text prompt")
        return encode_text(tokenizer, body.prompt, add_special_tokens=body.add_special_tokens, param="prompt")
    return list(body.prompt)


def _session_error(exc: SessionError) -> OpenAIError:
    status = 404 if "no saved session" in str(exc) else 400
    return OpenAIError(status, str(exc), param="name")


async def save_session(body: SessionSaveRequest, request: Request) -> SessionResponse:
    state = get_state(request)
    state.check_model(body.model)
    llm = state.require_llm_engine()
    directory = _session_dir(state)
    tokens = _conversation_tokens(state, body)
    try:
        num_tokens = await asyncio.to_thread(llm.save_session, body.name, tokens, directory)
    except SessionError as exc:
        raise _session_error(exc) from None
    return SessionResponse(name=body.name, num_tokens=num_tokens)


async def load_session(body: SessionLoadRequest, request: Request) -> SessionResponse:
    state = get_state(request)
    state.check_model(body.model)
    llm = state.require_llm_engine()
    directory = _session_dir(state)
    try:
        num_tokens = await asyncio.to_thread(llm.load_session, body.name, directory, state.settings.max_session_bytes)
    except SessionError as exc:
        raise _session_error(exc) from None
    return SessionResponse(name=body.name, num_tokens=num_tokens)
