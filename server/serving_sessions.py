"""Recurrent-state endpoints: `/props` (what a request's state costs) and named sessions.

A session is a conversation's cached state written to disk under a name, restorable after a
restart into the prefix cache, so the next turn resumes without re-reading the history.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import Request

from megalodon_infer.core.sessions import SessionError
from server.errors import OpenAIError, invalid_request
from server.prompts import chat_prompt, encode_text, off_loop
from server.protocol import ChatCompletionRequest
from server.protocol_extensions import SessionLoadRequest, SessionResponse, SessionSaveRequest
from server.state import ServerState, get_state
from server.tenancy import session_location


async def props(request: Request) -> dict:
    """Chunk size, slots, bytes per slot and per snapshot, limits, prefix cache and kernel backend."""
    state = get_state(request)
    engine = state.require_engine()
    # NOTE: read under the engine's lock, off the event loop (the engine thread mutates the cache).
    engine_props = await asyncio.to_thread(engine.props)
    return {"model": state.model_name, **engine_props, "sessions": state.settings.session_dir is not None}


def _session_dir(state: ServerState):
    directory = state.settings.session_dir
    if directory is None:
        raise invalid_request("Sessions are off on this server: start it with --session-dir.")
    return directory


async def _conversation_tokens(state: ServerState, body: SessionSaveRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request("Give the conversation as exactly one of 'prompt' or 'messages'.", param="prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=False)
        return (await chat_prompt(state, chat)).token_ids
    if isinstance(body.prompt, str):
        tokenizer = state.require_tokenizer("a text prompt")
        return await off_loop(len(body.prompt), encode_text, tokenizer, body.prompt,
                              add_special_tokens=body.add_special_tokens, param="prompt")
    return list(body.prompt)


def _session_error(exc: SessionError) -> OpenAIError:
    status = 404 if "no saved session" in str(exc) else 400
    return OpenAIError(status, str(exc), param="name")


def _owner_salt(state: ServerState, owner: str) -> str | None:
    """The cache namespace a tenant's own requests use (`server.tenancy.cache_salt` without a salt)."""
    return f"{owner}/" if owner and not state.settings.share_prefix_cache else None


async def save_session(body: SessionSaveRequest, request: Request) -> SessionResponse:
    """Save the conversation's cached state under `name`, in the folder of the caller's key."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    directory, name, owner = _located(request, state, body.name)
    tokens = await _conversation_tokens(state, body)
    try:
        num_tokens = await engine.save_session(name, tokens, directory, _owner_salt(state, owner))
    except SessionError as exc:
        raise _session_error(exc) from None
    return SessionResponse(name=body.name, num_tokens=num_tokens, tenant=owner or None)


async def load_session(body: SessionLoadRequest, request: Request) -> SessionResponse:
    """Put a saved state back into the prefix cache, in its owner's namespace."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    directory, name, owner = _located(request, state, body.name)
    try:
        num_tokens = await engine.load_session(name, directory, state.settings.max_session_bytes,
                                               _owner_salt(state, owner))
    except SessionError as exc:
        raise _session_error(exc) from None
    return SessionResponse(name=body.name, num_tokens=num_tokens, tenant=owner or None)


def _located(request: Request, state: ServerState, name: str) -> tuple[Path, str, str]:
    try:
        return session_location(request, state.settings, _session_dir(state), name)
    except SessionError as exc:
        raise _session_error(exc) from None
