"""`POST /v1/chat/completions`: messages -> chat template -> engine -> a `chat.completion` response
or a stream of `chat.completion.chunk`s.

Owns the chat response: the assistant message per choice (its content and `tool_calls`), chat
logprobs (`content` entries with `top_logprobs`), and the stream order (one role chunk per choice
once the first token is ready, then content and `tool_calls` deltas, the last one carrying
`finish_reason`, which is "tool_calls" when the answer called tools). Templates, tool plans and
parsing, the engine bridge and the SSE framing live elsewhere.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from megalodon_infer.engine.outputs import RequestOutput
from server.access_log import arrival_time_of
from server.errors import invalid_request
from server.generation import EngineRequest, Generation, compile_constraints
from server.logprobs import TokenFormatter, tokens_as_ids
from server.prompts import chat_prompt, sampling_params_for
from server.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from server.state import get_state
from server.streaming import StreamAssembler, respond
from server.structured import constraint_param
from server.tenancy import cache_salt
from server.tool_calls import FunctionSpec, ToolPlan, plan_tools
from server.tool_parser import CallDelta, ToolCallParser

ASSISTANT = "assistant"


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Handle one chat completions request (streaming or not)."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    if body.echo:
        raise invalid_request("echo is not supported for chat completions.", param="echo")
    arrival = arrival_time_of(request.scope)
    plan = chat_tool_plan(body)
    prompt = await chat_prompt(state, body, plan.template_tools)
    params = sampling_params_for(body, plan.constraint)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    formatter = TokenFormatter(state.tokenizer, as_ids=tokens_as_ids(body))
    consumer = ChatAssembler(body, len(prompt.token_ids), formatter, response_id, state.model_name, plan)
    salt = cache_salt(request, state.settings, body.cache_salt)
    engine_requests = [EngineRequest(f"{response_id}-0", prompt.token_ids, params, salt)]
    param = "tools" if plan.constraint is not None else constraint_param(body.response_format, body.structured_outputs)
    await compile_constraints(engine, engine_requests, param)
    generation = Generation(engine, state.metrics, arrival)
    generation.start(engine_requests)
    return await respond(request, generation, consumer, body.stream, state.settings.keepalive_interval)


def chat_tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    functions = [FunctionSpec(t.function.name, t.function.description, t.function.parameters, t.function.strict)
                 for t in body.tools or []]
    choice = body.tool_choice
    return plan_tools(functions, choice if isinstance(choice, str) or choice is None else choice.function.name,
                      body.parallel_tool_calls)


class ChatAssembler(StreamAssembler):
    """Turns the outputs of one chat completions request into stream chunks or the final response."""

    chunk_type = ChatCompletionStreamResponse

    def __init__(self, body: ChatCompletionRequest, num_prompt_tokens: int, formatter: TokenFormatter,
                 response_id: str, model_name: str, plan: ToolPlan) -> None:
        self.formatter = formatter
        self.num_prompt_tokens = num_prompt_tokens
        super().__init__(response_id, model_name, body.stream_options)
        self.want_logprobs = body.logprobs
        self.top_logprobs = body.top_logprobs or 0
        self.num_choices = body.n or 1
        self.num_tokens = [0] * self.num_choices
        self.num_cached_tokens = 0
        self.role_sent = False
        # one parse per choice when the answer may call tools
        self.parsers = [ToolCallParser(plan.max_calls) for _ in range(self.num_choices)] if plan.parse else None

    def pieces(self, output: RequestOutput) -> list[ChatCompletionResponseStreamChoice]:
        """What `output` adds to each of its choices (content and tool-call deltas, logprobs, finish)."""
        self.num_cached_tokens = output.num_cached_tokens
        pieces = []
        for delta in output.outputs:
            self.num_tokens[delta.index] += len(delta.token_ids)
            entries = self.formatter.chat(delta.logprobs, self.top_logprobs) if self.want_logprobs else []
            logprobs = ChatCompletionLogProbs(content=entries) if self.want_logprobs else None
            if self.parsers is None:
                if delta.text or entries or delta.finish_reason is not None:
                    pieces.append(ChatCompletionResponseStreamChoice(
                        index=delta.index, delta=DeltaMessage(content=delta.text), logprobs=logprobs,
                        finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))
                continue
            parser = self.parsers[delta.index]
            parsed = parser.push(delta.text)
            if delta.finish_reason is not None:
                parsed.extend(parser.finish())
            choice_pieces = []
            if parsed.content or entries:
                choice_pieces.append(ChatCompletionResponseStreamChoice(
                    index=delta.index, delta=DeltaMessage(content=parsed.content), logprobs=logprobs))
            if parsed.calls:
                choice_pieces.append(ChatCompletionResponseStreamChoice(
                    index=delta.index, delta=DeltaMessage(tool_calls=_tool_call_deltas(parsed.calls))))
            if delta.finish_reason is not None:
                if not choice_pieces:
                    choice_pieces.append(ChatCompletionResponseStreamChoice(index=delta.index, delta=DeltaMessage()))
                reason = "tool_calls" if delta.finish_reason == "stop" and parser.calls else delta.finish_reason
                choice_pieces[-1].finish_reason, choice_pieces[-1].stop_reason = reason, delta.stop_reason
            pieces += choice_pieces
        return pieces

    def chunks(self, index: int, output: RequestOutput) -> list[BaseModel]:
        chunks: list[BaseModel] = []
        if not self.role_sent:
            # NOTE: sent with the first output, not on arrival: clients time the first token by it.
            self.role_sent = True
            chunks += [self._chunk(ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(role=ASSISTANT, content=""))) for i in range(self.num_choices)]
        return chunks + [self._chunk(piece) for piece in self.pieces(output)]

    def usage(self) -> UsageInfo:
        return UsageInfo.of(prompt_tokens=self.num_prompt_tokens, completion_tokens=sum(self.num_tokens),
                            cached_tokens=self.num_cached_tokens)

    def response(self, finals: list[RequestOutput]) -> ChatCompletionResponse:
        by_index: dict[int, list[ChatCompletionResponseStreamChoice]] = {}
        for piece in self.pieces(finals[0]):
            by_index.setdefault(piece.index, []).append(piece)
        choices = [self._choice(i, pieces) for i, pieces in sorted(by_index.items())]
        return ChatCompletionResponse(id=self.response_id, created=self.created, model=self.model_name,
                                      choices=choices, usage=self.usage())

    def _choice(self, index: int, pieces: list[ChatCompletionResponseStreamChoice]) -> ChatCompletionResponseChoice:
        """A whole choice from its pieces (of one merged output: content first, then tool calls)."""
        content = "".join(piece.delta.content or "" for piece in pieces)
        logprobs = next((piece.logprobs for piece in pieces if piece.logprobs is not None), None)
        calls = self.parsers[index].calls if self.parsers is not None else []
        tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
        message = ChatMessage(role=ASSISTANT, content=content or (None if tool_calls else ""),
                              tool_calls=tool_calls or None)
        return ChatCompletionResponseChoice(index=index, message=message, logprobs=logprobs,
                                            finish_reason=pieces[-1].finish_reason, stop_reason=pieces[-1].stop_reason)


def _tool_call_deltas(calls: list[CallDelta]) -> list[DeltaToolCall]:
    """Tool-call news as the openai SDK accumulates it: consecutive news of one call merged."""
    merged: list[DeltaToolCall] = []
    for call in calls:
        last = merged[-1] if merged else None
        if last is not None and last.index == call.index and call.id is None and last.function is not None:
            last.function.arguments = (last.function.arguments or "") + call.arguments
            continue
        merged.append(DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                                    function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
    return merged
