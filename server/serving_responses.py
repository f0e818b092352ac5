"""`/v1/responses`: create (streaming or not), retrieve and delete, with conversations that resume
from their recurrent state.

Owns building a turn's prompt. A new conversation is its instructions (as the system message),
input and tools rendered by the chat template. A turn with `previous_response_id` is the previous
response's exact token history (its prompt ids, then every id it generated) followed by the
template's continuation for only the new input (`Tokenizer.encode_chat_continuation`): the engine's
prefix cache holds the state after that history (a finished request stores the state after every
token it consumed), so only the new input is prefilled and `cached_tokens` counts the history.
When the instructions or tools changed, or the template cannot continue a conversation, the stored
messages are re-rendered instead (a full prefill). An unknown, deleted, evicted or other tenant's
id is a 404. Storage is `server.responses_store`; events and items are `server.responses_stream`.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from megalodon_infer.core.sessions import SessionError
from megalodon_infer.engine.async_engine import AsyncEngine
from megalodon_infer.sample.params import SamplingParams, StructuredOutputsParams
from megalodon_infer.tokenization.tokenizer import Tokenizer
from server.access_log import CLIENT_CLOSED_REQUEST, arrival_time_of
from server.errors import InvalidParameterError, OpenAIError
from server.generation import EngineRequest, Generation, compile_constraints
from server.prompts import off_loop
from server.protocol_responses import ResponseDeleted, ResponseObject, ResponsesRequest
from server.protocol_tools import JsonSchemaSpec, ResponseFormat
from server.responses_input import function_specs, input_messages, tool_choice_name
from server.responses_store import ResponseStore, StoredResponse, valid_id
from server.responses_stream import ResponsesAssembler, stream_response
from server.state import ServerState, get_state
from server.streaming import final_outputs
from server.structured import constraint_of, constraint_param
from server.tenancy import cache_salt, tenant
from server.tool_calls import ToolPlan, plan_tools

logger = logging.getLogger("megalodon.server")

# Sampling fields that map one-to-one onto SamplingParams (None: the engine's default).
_PASSTHROUGH = ("temperature", "top_p", "seed", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "min_tokens", "ignore_eos")


def response_store(request: Request) -> ResponseStore:
    return request.app.state.responses


def not_found(response_id: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, f"No response with id {response_id!r} is stored (it was never stored, was deleted, "
                       "or was evicted from the store).", param=param)


async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """Handle `POST /v1/responses`."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    tokenizer = state.require_tokenizer("the Responses API")
    arrival = arrival_time_of(request.scope)
    store, owner = response_store(request), tenant(request)
    plan = plan_tools(function_specs(body.tools), tool_choice_name(body.tool_choice), body.parallel_tool_calls)
    new_messages = input_messages(body.input)
    previous = None
    if body.previous_response_id is not None:
        previous = await store.get(owner, body.previous_response_id) if valid_id(body.previous_response_id) else None
        if previous is None:
            raise not_found(body.previous_response_id, param="previous_response_id")
    size = sum(len(str(m.get("content") or "")) for m in new_messages)
    prompt_ids, conversation, continued = await off_loop(size, _prompt, tokenizer, previous, body.instructions,
                                                         new_messages, plan.template_tools)
    salt = cache_salt(request, state.settings, body.cache_salt)
    if continued and previous is not None:
        await _restore_state(engine, store, state, previous, salt)
    response_id = f"resp_{uuid.uuid4().hex}"
    assembler = ResponsesAssembler(_skeleton(body, response_id, state.model_name), prompt_ids, plan.parse,
                                   plan.max_calls, body.return_token_ids)
    engine_requests = [EngineRequest(f"{response_id}-0", prompt_ids, _sampling_params(body, plan), salt)]
    param = "tools" if plan.constraint is not None else constraint_param(None, body.structured_outputs, "text.format")
    await compile_constraints(engine, engine_requests, param)
    generation = Generation(engine, state.metrics, arrival)
    generation.start(engine_requests)

    def finished() -> None:
        request.state.usage = (len(prompt_ids), len(assembler.output_ids))
        if body.store:
            _store(store, engine, state, owner, salt, assembler, prompt_ids, conversation, body, plan)

    if body.stream:
        return stream_response(request, generation, assembler, state.settings.keepalive_interval, finished)
    finals = await final_outputs(request, generation)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    assembler.response_of(finals)
    finished()
    return JSONResponse(assembler.response.model_dump(mode="json"))


async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    """`GET /v1/responses/{id}`: a stored response, as it was returned."""
    record = await response_store(request).get(tenant(request), response_id) if valid_id(response_id) else None
    if record is None:
        raise not_found(response_id)
    return JSONResponse(record.response)


async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
    """`DELETE /v1/responses/{id}`: forget a stored response (and its files); 404 if unknown."""
    if not (valid_id(response_id) and await response_store(request).delete(tenant(request), response_id)):
        raise not_found(response_id)
    return ResponseDeleted(id=response_id)


def _prompt(tokenizer: Tokenizer, previous: StoredResponse | None, instructions: str | None,
            new_messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
            ) -> tuple[list[int], list[dict[str, Any]], bool]:
    """(prompt ids, the conversation before this turn's reply, whether the history was continued)."""
    kwargs = {"tools": tools} if tools else {}
    if previous is None:
        return tokenizer.encode_chat(_with_instructions(instructions, new_messages), **kwargs), new_messages, False
    conversation = [*previous.messages, previous.reply, *new_messages]
    if previous.instructions == instructions and previous.template_tools == tools:
        continuation = tokenizer.encode_chat_continuation(_with_instructions(instructions, previous.messages),
                                                          new_messages, history_ids=previous.history_ids, **kwargs)
        if continuation is not None:
            return previous.history_ids + continuation, conversation, True
    return tokenizer.encode_chat(_with_instructions(instructions, conversation), **kwargs), conversation, False


def _with_instructions(instructions: str | None, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return ([{"role": "system", "content": instructions}] if instructions is not None else []) + messages


async def _restore_state(engine: AsyncEngine, store: ResponseStore, state: ServerState, previous: StoredResponse,
                         salt: str | None) -> None:
    """After a restart (or an eviction), put the previous turn's saved state back into the prefix cache."""
    folder = store.folder(previous.tenant)
    consumed = len(previous.history_ids) - 1  # the last generated token was never fed
    if folder is None or not previous.state_saved:
        return
    if await engine.cached_length(previous.history_ids, salt) >= consumed:
        return
    try:
        await engine.load_session(previous.id, folder, state.settings.max_session_bytes, salt)
    except SessionError as exc:  # the history is then prefilled again: slower, same tokens
        logger.warning("could not restore the state of %s: %s", previous.id, exc)


def _store(store: ResponseStore, engine: AsyncEngine, state: ServerState, owner: str, salt: str | None,
           assembler: ResponsesAssembler, prompt_ids: list[int], conversation: list[dict[str, Any]],
           body: ResponsesRequest, plan: ToolPlan) -> None:
    response = assembler.response
    history = prompt_ids + assembler.output_ids
    record = StoredResponse(id=response.id, tenant=owner, response=response.model_dump(mode="json"),
                            history_ids=history, messages=conversation, reply=assembler.reply_message(),
                            instructions=body.instructions, template_tools=plan.template_tools)

    async def save_state(folder: Path) -> bool:
        try:
            await engine.save_session(response.id, history, folder, salt)
        except SessionError as exc:
            logger.info("response %s kept without its state (%s): the next turn re-prefills it", response.id, exc)
            return False
        return True

    store.put(record, save_state if state.settings.session_dir is not None else None)


def _sampling_params(body: ResponsesRequest, plan: ToolPlan) -> SamplingParams:
    kwargs: dict[str, Any] = {name: getattr(body, name) for name in _PASSTHROUGH if getattr(body, name) is not None}
    kwargs["top_k"] = -1 if body.top_k in (None, 0) else body.top_k
    kwargs["max_tokens"] = body.max_output_tokens
    kwargs["structured_outputs"] = plan.constraint if plan.constraint is not None else _text_constraint(body)
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise InvalidParameterError(str(exc), param="max_output_tokens" if field == "max_tokens" else field) from None


def _text_constraint(body: ResponsesRequest) -> StructuredOutputsParams | None:
    """`text.format` (flat in the Responses API) as chat's `response_format`."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return constraint_of(None, body.structured_outputs)
    schema = None
    if fmt.type == "json_schema":
        schema = JsonSchemaSpec(name=fmt.name, schema=fmt.json_schema, strict=fmt.strict)
    try:
        response_format = ResponseFormat(type=fmt.type, json_schema=schema)
    except ValueError as exc:
        raise InvalidParameterError(str(exc).splitlines()[-1], param="text.format") from None
    return constraint_of(response_format, body.structured_outputs, format_param="text.format")


def _skeleton(body: ResponsesRequest, response_id: str, model: str) -> ResponseObject:
    """The response object before any output: what it echoes of the request."""
    choice = body.tool_choice
    return ResponseObject(
        id=response_id, model=model, instructions=body.instructions, max_output_tokens=body.max_output_tokens,
        previous_response_id=body.previous_response_id, parallel_tool_calls=body.parallel_tool_calls,
        temperature=body.temperature, top_p=body.top_p,
        tool_choice=choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto"),
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []],
        text={"format": body.text.format.model_dump(by_alias=True, exclude_none=True)} if body.text else
        {"format": {"type": "text"}},
        store=body.store, metadata=body.metadata or {}, user=body.user)
