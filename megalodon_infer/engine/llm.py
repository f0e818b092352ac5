"""Offline batch API in vLLM's shape: `LLM(path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megalodon_infer.config import EngineConfig
from megalodon_infer.core.scheduler import AddResult
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.engine.outputs import RequestOutput
from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.sample.params import SamplingParams
from megalodon_infer.tokenization.tokenizer import Tokenizer


class LLM:
    """Runs batches of prompts to completion on one engine (continuous batching inside)."""

    def __init__(self, model: str | Path | Megalodon, tokenizer: Tokenizer | None = None, **engine_options) -> None:
        """`model`: a checkpoint directory or a loaded `Megalodon`; `engine_options`: `EngineConfig`
        fields (`dtype`, `device`, `max_num_seqs`, ...)."""
        if isinstance(model, Megalodon):
            self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_options))
        else:
            self.engine = LLMEngine.from_config(EngineConfig(model=Path(model), **engine_options))
            if tokenizer is not None:
                self.engine.tokenizer = tokenizer
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text, or token ids). Returns one finished `RequestOutput` per
        prompt, in prompt order, each choice's tokens, text and logprobs complete."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = (list(sampling_params) if isinstance(sampling_params, Sequence)
                       else [sampling_params or SamplingParams()] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        outputs: dict[str, list[RequestOutput]] = {}
        queue = list(zip(prompts, params_list, strict=True))
        while queue or self.engine.has_unfinished_requests():
            while queue:
                prompt, params = queue[0]
                request_id = f"offline-{self._counter}"
                if self.engine.add_request(request_id, self._encode(prompt), params) is AddResult.OVERLOADED:
                    break  # the waiting queue is full: run steps until it drains
                queue.pop(0)
                self._counter += 1
                outputs[request_id] = []
            for output in self.engine.step():
                outputs[output.request_id].append(output)
        return [RequestOutput.merged(parts) for parts in outputs.values()]

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]
