"""`POST /v1/chat/completions`: messages -> chat template -> engine -> a `chat.completion` response
or a stream of `chat.completion.chunk`s.

Owns the chat response: the assistant message per choice, chat logprobs (`content` entries with
`top_logprobs`), and the stream order (one role chunk per choice once the first token is ready,
then content deltas, the last one carrying `finish_reason`). Templates, the engine bridge and the
SSE framing live elsewhere.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from megalodon_infer.outputs import RequestOutput
from server.access_log import arrival_time_of
from server.errors import invalid_request
from server.generation import EngineRequest, GenerationGroup
from server.logprobs import TokenFormatter, tokens_as_ids
from server.prompts import chat_prompt, sampling_params_for
from server.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)
from server.state import get_state
from server.streaming import StreamAssembler, respond

ASSISTANT = "assistant"


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Handle one chat completions request (streaming or not)."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    if body.echo:
        raise invalid_request("echo is not supported for chat completions.", param="echo")
    arrival = arrival_time_of(request.scope)
    prompt = chat_prompt(state, body)
    params = sampling_params_for(body, prompt.token_ids, state.max_model_len)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    formatter = TokenFormatter(state.tokenizer, as_ids=tokens_as_ids(body))
    consumer = ChatAssembler(body, len(prompt.token_ids), formatter, response_id, state.model_name)
    group = GenerationGroup(engine, state.metrics, arrival)
    await group.start([EngineRequest(f"{response_id}-0", prompt.token_ids, params)])
    return await respond(request, group, consumer, body.stream, state.settings.keepalive_interval)


class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.num_tokens = 0
        self.logprobs: list[ChatCompletionLogProbsContent] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class ChatAssembler(StreamAssembler):
    """Builds the stream chunks and the final response of one chat completions request."""

    chunk_type = ChatCompletionStreamResponse

    def __init__(self, body: ChatCompletionRequest, num_prompt_tokens: int, formatter: TokenFormatter,
                 response_id: str, model_name: str) -> None:
        self.formatter = formatter
        self.num_prompt_tokens = num_prompt_tokens
        super().__init__(response_id, model_name, body.stream_options)
        self.want_logprobs = body.logprobs
        self.top_logprobs = body.top_logprobs or 0
        self.choices = [_Choice() for _ in range(body.n or 1)]
        self.num_cached_tokens = 0
        self.role_sent = False

    def update(self, index: int, output: RequestOutput) -> list[BaseModel]:
        self.num_cached_tokens = output.num_cached_tokens
        chunks: list[BaseModel] = []
        if not self.role_sent:
            # NOTE: sent with the first output, not on arrival: clients time the first token by it.
            self.role_sent = True
            chunks += [self._chunk(ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(role=ASSISTANT, content=""))) for i in range(len(self.choices))]
        for delta in output.outputs:
            choice = self.choices[delta.index]
            choice.text.append(delta.text)
            choice.num_tokens += len(delta.token_ids)
            entries = self.formatter.chat(delta.logprobs, self.top_logprobs) if self.want_logprobs else []
            choice.logprobs += entries
            if delta.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if delta.text or entries or delta.finish_reason is not None:
                chunks.append(self._chunk(ChatCompletionResponseStreamChoice(
                    index=delta.index, delta=DeltaMessage(content=delta.text),
                    logprobs=ChatCompletionLogProbs(content=entries) if self.want_logprobs else None,
                    finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)))
        return chunks

    def usage(self) -> UsageInfo:
        return UsageInfo.of(prompt_tokens=self.num_prompt_tokens,
                            completion_tokens=sum(choice.num_tokens for choice in self.choices),
                            cached_tokens=self.num_cached_tokens)

    def response(self) -> ChatCompletionResponse:
        choices = [
            ChatCompletionResponseChoice(
                index=i,
                message=ChatMessage(role=ASSISTANT, content="".join(choice.text)),
                logprobs=ChatCompletionLogProbs(content=choice.logprobs) if self.want_logprobs else None,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            for i, choice in enumerate(self.choices)
        ]
        return ChatCompletionResponse(id=self.response_id, created=self.created, model=self.model_name,
                                      choices=choices, usage=self.usage())
