"""`POST /v1/completions`: prompts -> engine requests -> a `text_completion` response or stream.

Owns the completions response: one choice per prompt and sample (index = prompt_index * n + i),
`echo` (the prompt text first, and with `logprobs` the prompt's logprobs on its exact input ids),
legacy logprobs, and usage. Tokenization, the engine bridge and the SSE framing live elsewhere.
"""

from __future__ import annotations

import uuid

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from megalodon_infer.outputs import RequestOutput
from megalodon_infer.sampling import PromptLogprobs
from server.access_log import arrival_time_of
from server.generation import EngineRequest, GenerationGroup
from server.logprobs import (
    CompletionLogprobsBuilder,
    TokenFormatter,
    concat_completion_logprobs,
    prompt_entries,
    sampled_entries,
    tokens_as_ids,
)
from server.prompts import PromptInput, completion_prompts, sampling_params_for
from server.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from server.state import get_state
from server.streaming import StreamAssembler, respond


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Handle one completions request (streaming or not)."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    arrival = arrival_time_of(request.scope)
    prompts = completion_prompts(state, body)
    params = [sampling_params_for(body, prompt.token_ids, state.max_model_len) for prompt in prompts]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    formatter = TokenFormatter(state.tokenizer, as_ids=tokens_as_ids(body))
    consumer = CompletionAssembler(body, prompts, formatter, response_id, state.model_name)
    group = GenerationGroup(engine, state.metrics, arrival)
    await group.start([EngineRequest(f"{response_id}-{i}", prompt.token_ids, params[i])
                       for i, prompt in enumerate(prompts)])
    return await respond(request, group, consumer, body.stream, state.settings.keepalive_interval)


class _Choice:
    def __init__(self, formatter: TokenFormatter) -> None:
        self.text: list[str] = []
        self.num_tokens = 0
        self.logprobs = CompletionLogprobsBuilder(formatter)
        self.logprob_parts: list[CompletionLogProbs] = []
        self.echoed = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class CompletionAssembler(StreamAssembler):
    """Builds the stream chunks and the final response of one completions request."""

    chunk_type = CompletionStreamResponse

    def __init__(self, body: CompletionRequest, prompts: list[PromptInput], formatter: TokenFormatter,
                 response_id: str, model_name: str) -> None:
        self.body = body
        self.prompts = prompts
        self.formatter = formatter
        super().__init__(response_id, model_name, body.stream_options)
        self.n = body.n or 1
        self.want_logprobs = body.logprobs is not None
        self.choices = [_Choice(formatter) for _ in range(len(prompts) * self.n)]
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}
        self.num_cached_tokens = [0] * len(prompts)

    def update(self, index: int, output: RequestOutput) -> list[BaseModel]:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[index] = output.prompt_logprobs
        self.num_cached_tokens[index] = output.num_cached_tokens
        chunks: list[BaseModel] = []
        for delta in output.outputs:
            choice_index = index * self.n + delta.index
            choice = self.choices[choice_index]
            text = delta.text
            entries = sampled_entries(delta.logprobs) if self.want_logprobs else []
            if self.body.echo and not choice.echoed:
                choice.echoed = True
                text = self._prompt_text(index) + text
                if self.want_logprobs:
                    entries = prompt_entries(self.prompt_logprobs.get(index)) + entries
            choice.text.append(text)
            choice.num_tokens += len(delta.token_ids)
            logprobs = choice.logprobs.build(entries) if self.want_logprobs else None
            if logprobs is not None:
                choice.logprob_parts.append(logprobs)
            if delta.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if text or delta.finish_reason is not None or (logprobs is not None and logprobs.tokens):
                chunks.append(self._chunk(CompletionResponseStreamChoice(
                    index=choice_index, text=text, logprobs=logprobs,
                    finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)))
        return chunks

    def _prompt_text(self, index: int) -> str:
        prompt = self.prompts[index]
        if prompt.text is not None:
            return prompt.text
        tokenizer = self.formatter.tokenizer
        return tokenizer.decode(prompt.token_ids) if tokenizer is not None else ""

    def usage(self) -> UsageInfo:
        return UsageInfo.of(prompt_tokens=sum(len(prompt.token_ids) for prompt in self.prompts),
                            completion_tokens=sum(choice.num_tokens for choice in self.choices),
                            cached_tokens=sum(self.num_cached_tokens))

    def response(self) -> CompletionResponse:
        choices = [
            CompletionResponseChoice(
                index=i,
                text="".join(choice.text),
                logprobs=concat_completion_logprobs(choice.logprob_parts) if self.want_logprobs else None,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            for i, choice in enumerate(self.choices)
        ]
        return CompletionResponse(id=self.response_id, created=self.created, model=self.model_name,
                                  choices=choices, usage=self.usage())
