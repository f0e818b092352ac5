"""The engine's bookkeeping for one request: its choices, their text and the reasons they stop.

Owns turning sampled token ids into finished/unfinished choices with text deltas (detokenizer and
stop strings), and the request's timestamps. Knows nothing of slots, tensors or the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from .sampling import PromptLogprobs, SequenceSamplingState
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Choice:
    """One of a request's n sequences."""

    index: int
    sampler: SequenceSamplingState
    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher | None
    slot_id: int = -1
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # what accumulated since the last RequestOutput
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reported: bool = False

    @property
    def has_news(self) -> bool:
        return bool(self.new_ids or self.new_text) or (self.finish_reason is not None and not self.finish_reported)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def take_delta(self, want_logprobs: bool) -> CompletionOutput:
        out = CompletionOutput(index=self.index, token_ids=self.new_ids, text=self.new_text,
                               logprobs=self.new_logprobs if want_logprobs else None,
                               finish_reason=self.finish_reason, stop_reason=self.stop_reason)
        self.new_ids, self.new_text, self.new_logprobs = [], "", []
        self.finish_reported = self.finish_reason is not None
        return out


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int,
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        eos_id = tokenizer.eos_id if tokenizer is not None else None
        self.eos_id = eos_id
        base = SequenceSamplingState(params, prompt_ids, vocab_size, eos_id)
        samplers = [base] if params.n == 1 else [base.clone_for_choice(i) for i in range(params.n)]
        self.choices = [self._make_choice(i, s) for i, s in enumerate(samplers)]
        self.metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self.prompt_logprobs: PromptLogprobs | None = (
            PromptLogprobs(token_ids=list(prompt_ids), logprobs=[None], top_logprobs=[None])
            if params.prompt_logprobs is not None else None)
        self.prompt_logprobs_sent = False
        self.prev_prompt_row = None  # [1, V] logits that score the first token of the next segment
        self.cached_first_logits = None  # [V] logits of a prompt found whole in the prefix cache
        self.pinned_entries: list = []  # prefix-cache entries this request stored, kept until it ends
        self.num_cached_tokens = 0
        self.prompt_complete = False
        self.aborted = False
        self.error: str | None = None

    def _make_choice(self, index: int, sampler: SequenceSamplingState) -> Choice:
        detok = stop = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.params.skip_special_tokens)
            if self.params.stop:
                stop = StopStringMatcher(self.params.stop, self.params.include_stop_str_in_output)
        return Choice(index=index, sampler=sampler, detokenizer=detok, stop_matcher=stop)

    @property
    def max_tokens(self) -> int:
        limit = self.max_model_len - len(self.prompt_ids)
        return limit if self.params.max_tokens is None else min(self.params.max_tokens, limit)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def processed_tokens(self, choice: Choice) -> list[int]:
        """The tokens the choice's state has consumed: the prompt and every output token but the last
        one while it waits to be fed (call before appending a newly sampled token)."""
        return self.prompt_ids + choice.output_ids

    def choice_for_slot(self, slot_id: int) -> Choice:
        for choice in self.choices:
            if choice.slot_id == slot_id:
                return choice
        raise KeyError(slot_id)

    # ------------------------------------------------------------------------ token handling
    def append_token(self, choice: Choice, token_id: int, logprob: TokenLogprob | None, now: float) -> None:
        """Record a sampled token; decide whether the choice stops here."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now
        choice.output_ids.append(token_id)
        choice.sampler.append_token(token_id)
        choice.new_ids.append(token_id)
        if logprob is not None:
            choice.new_logprobs.append(logprob)
        params = self.params
        num_out = len(choice.output_ids)
        stopped_by_token = num_out > params.min_tokens and (
            (token_id == self.eos_id and not params.ignore_eos) or token_id in params.stop_token_ids)
        if stopped_by_token:
            # the stop token's text is not part of the output (vLLM); its id is reported
            choice.finish_reason, choice.stop_reason = "stop", (None if token_id == self.eos_id else token_id)
            self._flush_text(choice)
            return
        if choice.detokenizer is not None:
            delta = choice.detokenizer.push(token_id)
            if choice.stop_matcher is not None:
                delta, stopped = choice.stop_matcher.push(delta)
                choice.new_text += delta
                if stopped and num_out >= params.min_tokens:
                    choice.finish_reason, choice.stop_reason = "stop", choice.stop_matcher.matched_stop
                    return
            else:
                choice.new_text += delta
        if num_out >= self.max_tokens:
            choice.finish_reason = "length"
            self._flush_text(choice)

    def _flush_text(self, choice: Choice) -> None:
        """Release text held back for a possible multi-byte character or stop-string prefix."""
        if choice.detokenizer is None:
            return
        tail = choice.detokenizer.flush()
        if choice.stop_matcher is not None:
            tail, _ = choice.stop_matcher.push(tail)
            tail += choice.stop_matcher.flush()
        choice.new_text += tail

    def finish_all(self, reason: str) -> None:
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = reason
                if reason != "error":
                    self._flush_text(choice)

    def make_output(self, now: float) -> RequestOutput:
        want_logprobs = self.params.logprobs is not None
        outputs = [c.take_delta(want_logprobs) for c in self.choices if c.has_news]
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and self.prompt_complete:
            prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs, True
        finished = self.finished
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = now
        return RequestOutput(request_id=self.request_id, prompt_token_ids=self.prompt_ids, outputs=outputs,
                             finished=finished, metrics=replace(self.metrics), prompt_logprobs=prompt_logprobs,
                             num_cached_tokens=self.num_cached_tokens, error=self.error)
