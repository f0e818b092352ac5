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

from megalodon_infer.engine.outputs import RequestOutput
from megalodon_infer.sample.logprobs import TokenLogprob
from server.access_log import arrival_time_of
from server.generation import EngineRequest, Generation, compile_constraints
from server.logprobs import CompletionLogprobsBuilder, TokenFormatter, tokens_as_ids
from server.prompts import PromptInput, completion_prompts, off_loop, sampling_params_for
from server.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from server.state import get_state
from server.streaming import StreamAssembler, respond
from server.structured import constraint_param
from server.tenancy import cache_salt


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """Handle one completions request (streaming or not)."""
    state = get_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    arrival = arrival_time_of(request.scope)
    prompts = await completion_prompts(state, body)
    params = [sampling_params_for(body) for _ in prompts]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    formatter = TokenFormatter(state.tokenizer, as_ids=tokens_as_ids(body))
    if body.echo and state.tokenizer is not None:  # the echoed text of token-id prompts, decoded once
        prompts = [p if p.text is not None else PromptInput(p.token_ids, await off_loop(
            len(p.token_ids), state.tokenizer.decode, p.token_ids)) for p in prompts]
    consumer = CompletionAssembler(body, prompts, formatter, response_id, state.model_name)
    salt = cache_salt(request, state.settings, body.cache_salt)
    engine_requests = [EngineRequest(f"{response_id}-{i}", prompt.token_ids, params[i], salt)
                       for i, prompt in enumerate(prompts)]
    await compile_constraints(engine, engine_requests, constraint_param(body.response_format, body.structured_outputs))
    generation = Generation(engine, state.metrics, arrival)
    generation.start(engine_requests)
    return await respond(request, generation, consumer, body.stream, state.settings.keepalive_interval)


class CompletionAssembler(StreamAssembler):
    """Turns the outputs of one completions request into stream chunks or the final response.

    Per choice it keeps only what the wire format carries across chunks: whether the prompt was
    echoed yet, the logprobs' running text offset, and the token count for usage.
    """

    chunk_type = CompletionStreamResponse

    def __init__(self, body: CompletionRequest, prompts: list[PromptInput], formatter: TokenFormatter,
                 response_id: str, model_name: str) -> None:
        self.body = body
        self.prompts = prompts
        self.formatter = formatter
        super().__init__(response_id, model_name, body.stream_options)
        self.n = body.n or 1
        self.want_logprobs = body.logprobs is not None
        num_choices = len(prompts) * self.n
        self.echoed = [False] * num_choices
        self.logprobs = [CompletionLogprobsBuilder(formatter) for _ in range(num_choices)]
        self.num_tokens = [0] * num_choices
        self.num_cached_tokens = [0] * len(prompts)

    def pieces(self, index: int, output: RequestOutput) -> list[CompletionResponseStreamChoice]:
        """What `output` (of prompt `index`) adds to each of its choices."""
        self.num_cached_tokens[index] = output.num_cached_tokens
        pieces = []
        for delta in output.outputs:
            choice_index = index * self.n + delta.index
            text = delta.text
            entries: list[TokenLogprob] = list(delta.logprobs or []) if self.want_logprobs else []
            if self.body.echo and not self.echoed[choice_index]:
                self.echoed[choice_index] = True
                text = self._prompt_text(index) + text
                if self.want_logprobs:
                    entries = list(output.prompt_logprobs or []) + entries
            self.num_tokens[choice_index] += len(delta.token_ids)
            logprobs = self.logprobs[choice_index].build(entries) if self.want_logprobs else None
            if text or delta.finish_reason is not None or (logprobs is not None and logprobs.tokens):
                pieces.append(CompletionResponseStreamChoice(
                    index=choice_index, text=text, logprobs=logprobs,
                    finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))
        return pieces

    def chunks(self, index: int, output: RequestOutput) -> list[BaseModel]:
        return [self._chunk(piece) for piece in self.pieces(index, output)]

    def _prompt_text(self, index: int) -> str:
        prompt = self.prompts[index]
        if prompt.text is not None:
            return prompt.text
        tokenizer = self.formatter.tokenizer
        return tokenizer.decode(prompt.token_ids) if tokenizer is not None else ""

    def usage(self) -> UsageInfo:
        return UsageInfo.of(prompt_tokens=sum(len(prompt.token_ids) for prompt in self.prompts),
                            completion_tokens=sum(self.num_tokens), cached_tokens=sum(self.num_cached_tokens))

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        pieces = {piece.index: piece for index, output in enumerate(finals) for piece in self.pieces(index, output)}
        choices = [CompletionResponseChoice(index=i, text=p.text, logprobs=p.logprobs, finish_reason=p.finish_reason,
                                            stop_reason=p.stop_reason) for i, p in sorted(pieces.items())]
        return CompletionResponse(id=self.response_id, created=self.created, model=self.model_name,
                                  choices=choices, usage=self.usage())
