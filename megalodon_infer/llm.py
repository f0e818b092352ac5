"""Offline batch API in vLLM's shape: `LLM(path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .engine import LLMEngine
from .engine_config import EngineConfig
from .loading import load_model
from .model.megalodon import Megalodon
from .outputs import RequestOutput, TokenLogprob
from .sampling import PromptLogprobs
from .sampling_params import SamplingParams
from .scheduler import AddResult
from .tokenizer import Tokenizer


@dataclass
class GeneratedChoice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class GenerationResult:
    """A finished request: prompt ids, each choice's ids and text, finish reasons, logprobs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[GeneratedChoice]
    prompt_logprobs: PromptLogprobs | None = None
    error: str | None = None


class LLM:
    """Runs batches of prompts to completion on one engine (continuous batching inside)."""

    def __init__(self, model: str | Path | Megalodon, tokenizer: Tokenizer | None = None, dtype: str = "float32",
                 device: str = "cpu", **engine_options) -> None:
        if isinstance(model, Megalodon):
            loaded = model
        else:
            loaded = load_model(model, dtype=dtype, device=device)
            tokenizer = tokenizer or Tokenizer.from_dir(model)
        self.engine = LLMEngine(loaded, tokenizer, EngineConfig(**engine_options))
        self.tokenizer = tokenizer
        self._counter = 0

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationResult]:
        """Generate for each prompt (text, or token ids); results come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = (list(sampling_params) if isinstance(sampling_params, Sequence)
                       else [sampling_params or SamplingParams()] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        results: dict[str, GenerationResult] = {}
        order: list[str] = []
        queue = list(zip(prompts, params_list, strict=True))
        while queue or self.engine.has_unfinished_requests():
            while queue:
                prompt, params = queue[0]
                request_id = f"offline-{self._counter}"
                ids = self._encode(prompt)
                if self.engine.add_request(request_id, ids, params) is AddResult.OVERLOADED:
                    break  # the waiting queue is full: run steps until it drains
                queue.pop(0)
                self._counter += 1
                order.append(request_id)
                results[request_id] = GenerationResult(
                    request_id, prompt if isinstance(prompt, str) else None, ids,
                    [GeneratedChoice(i, logprobs=[] if params.logprobs is not None else None)
                     for i in range(params.n)])
            for output in self.engine.step():
                _merge(results[output.request_id], output)
        return [results[r] for r in order]

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]


def _merge(result: GenerationResult, output: RequestOutput) -> None:
    if output.prompt_logprobs is not None:
        result.prompt_logprobs = output.prompt_logprobs
    if output.error is not None:
        result.error = output.error
    for delta in output.outputs:
        choice = result.outputs[delta.index]
        choice.token_ids.extend(delta.token_ids)
        choice.text += delta.text
        if delta.logprobs is not None and choice.logprobs is not None:
            choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
