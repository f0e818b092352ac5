"""The request object: one per request (and one per choice) from admission to its last output.

`Request` extends the scheduler's `SchedRequest` (slots, prefill progress) with the prompt, the
settings, prefix-cache bookkeeping and timestamps; `Choice` extends the sampler's
`SequenceSamplingState` (generator, output ids, penalty tensors) with its slot, text (detokenizer and
stop strings) and the news accumulated since the last output. Adding a field to a request touches
this module only. Knows nothing of tensors beyond holding them, and nothing of HTTP.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megalodon_infer.core.scheduler import SchedRequest
from megalodon_infer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from megalodon_infer.sample.logprobs import PromptLogprobsBuilder, TokenLogprob
from megalodon_infer.sample.params import SamplingParams
from megalodon_infer.sample.sampler import SequenceSamplingState
from megalodon_infer.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher
from megalodon_infer.tokenization.tokenizer import Tokenizer

if TYPE_CHECKING:
    from megalodon_infer.core.prefix_cache import CacheEntry
    from megalodon_infer.sample.grammar import CompiledGrammar


class Choice(SequenceSamplingState):
    """One of a request's n sequences.

    `cache_parent`/`cache_depth`: the prefix-cache boundary entry this sequence's state continues
    from and its token count (None/0: the start of the context), so the next chunk boundary is
    stored under it in O(C); -1 when the chain is broken (not cached) and no boundary is stored.
    """

    def __init__(self, index: int, request: Request, tokenizer: Tokenizer | None, vocab_size: int,
                 device: torch.device, seed: int) -> None:
        grammar = request.grammar.matcher() if request.grammar is not None else None
        super().__init__(request.params, request.prompt_ids, vocab_size, request.eos_id, device=device, seed=seed,
                         grammar=grammar)
        self.index = index
        self.slot_id = -1
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cache_parent: CacheEntry | None = None
        self.cache_depth = 0
        self.detokenizer: IncrementalDetokenizer | None = None
        self.stop_matcher: StopStringMatcher | None = None
        params = request.params
        if tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids, params.skip_special_tokens)
            if params.stop:
                self.stop_matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        # what accumulated since the last RequestOutput
        self.new_ids: list[int] = []
        self.new_text: list[str] = []
        self.new_logprobs: list[TokenLogprob] = []
        self.finish_reported = False

    @property
    def has_news(self) -> bool:
        return bool(self.new_ids or self.new_text) or (self.finish_reason is not None and not self.finish_reported)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def num_fed_tokens(self) -> int:
        """Tokens this sequence's state has consumed once its last sampled token is fed."""
        return len(self.prompt_ids) + len(self.output_ids)

    def last_block(self, chunk_size: int) -> list[int]:
        """The last `chunk_size` tokens of prompt + output: the block a decode boundary stores (O(C))."""
        out = self.output_ids[-chunk_size:]
        need = chunk_size - len(out)
        return (self.prompt_ids[len(self.prompt_ids) - need:] if need else []) + out

    def take_delta(self, want_logprobs: bool) -> CompletionOutput:
        out = CompletionOutput(index=self.index, token_ids=self.new_ids, text="".join(self.new_text),
                               logprobs=self.new_logprobs if want_logprobs else None,
                               finish_reason=self.finish_reason, stop_reason=self.stop_reason)
        self.new_ids, self.new_text, self.new_logprobs = [], [], []
        self.finish_reported = self.finish_reason is not None
        return out


class Request(SchedRequest):
    """A validated request: its prompt, settings, choices and everything the engine tracks for it.

    `max_tokens` is the resolved output limit (the settings' own, or the room the context leaves).
    `grammar`: the compiled constraint of a structured-outputs request; each choice gets a matcher.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int, *,
                 tokenizer: Tokenizer | None, vocab_size: int, device: torch.device, arrival_time: float,
                 queued_time: float, cache_namespace: str = "", grammar: CompiledGrammar | None = None) -> None:
        super().__init__(request_id, len(prompt_ids), num_seqs=params.n)
        self.prompt_ids = prompt_ids
        self.params = params
        self.grammar = grammar
        self.max_tokens = max_tokens
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        self.metrics = RequestMetrics(arrival_time=arrival_time, queued_time=queued_time)
        # choice i draws from seed + i (vLLM's rule): choice 0 replays an n=1 request with that seed
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.choices = [Choice(i, self, tokenizer, vocab_size, device, seed + i) for i in range(params.n)]
        self.prompt_logprobs: PromptLogprobsBuilder | None = (
            PromptLogprobsBuilder(prompt_ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None)
        self.prompt_logprobs_sent = False
        self.cached_first_logits: Tensor | None = None  # [V] logits of a prompt found whole in the prefix cache
        self.pinned_entries: list[CacheEntry] = []  # prefix-cache entries kept while this request runs
        self.cache_namespace = cache_namespace  # the prefix-cache tree it reads and writes
        self.num_cached_tokens = 0
        self.prompt_complete = False
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

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
        choice.append_token(token_id)
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
                choice.new_text.append(delta)
                if stopped and num_out >= params.min_tokens:
                    choice.finish_reason, choice.stop_reason = "stop", choice.stop_matcher.matched_stop
                    return
            else:
                choice.new_text.append(delta)
        if choice.grammar is not None and choice.grammar.is_finished and not self._eos_may_follow(choice, token_id):
            # the constrained text is complete and the EOS its grammar now forces could not end the
            # choice (ignore_eos, min_tokens, the length limit): stop here, the text is whole
            choice.finish_reason = "stop"
            self._flush_text(choice)
            return
        if num_out >= self.max_tokens:
            choice.finish_reason = "length"
            self._flush_text(choice)

    def _eos_may_follow(self, choice: Choice, token_id: int) -> bool:
        """Whether the next step may sample EOS and end the choice with it.

        NOTE: a complete grammar allows only EOS next. Sampling it (one more decode step) ends the
        turn as the model and the chat template end turns, so a conversation's history reads the
        same as its re-rendered messages."""
        params = self.params
        num_out = len(choice.output_ids)
        return (self.eos_id is not None and token_id != self.eos_id and not params.ignore_eos
                and num_out >= params.min_tokens and num_out < self.max_tokens)

    def _flush_text(self, choice: Choice) -> None:
        """Release text held back for a possible multi-byte character or stop-string prefix."""
        if choice.detokenizer is None:
            return
        tail = choice.detokenizer.flush()
        if choice.stop_matcher is not None:
            tail, _ = choice.stop_matcher.push(tail)
            tail += choice.stop_matcher.flush()
        choice.new_text.append(tail)

    def finish_all(self, reason: str) -> None:
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.finish_reason = reason
                if reason != "error":
                    self._flush_text(choice)

    def fail(self, message: str) -> None:
        """End every choice with an error (the request alone: nothing else is touched)."""
        self.error = message
        self.finish_all("error")

    def make_output(self, now: float) -> RequestOutput:
        want_logprobs = self.params.logprobs is not None
        outputs = [c.take_delta(want_logprobs) for c in self.choices if c.has_news]
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and self.prompt_complete:
            prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs.entries, True
        finished = self.finished
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = now
        return RequestOutput(request_id=self.request_id, prompt_token_ids=self.prompt_ids, outputs=outputs,
                             finished=finished, metrics=RequestMetrics(**vars(self.metrics)),
                             prompt_logprobs=prompt_logprobs, num_cached_tokens=self.num_cached_tokens,
                             error=self.error)

    @property
    def finish_reason(self) -> str:
        """The request's reason for metrics: the most serious of its choices' reasons."""
        reasons = {c.finish_reason for c in self.choices}
        return next((r for r in ("error", "abort", "length", "stop") if r in reasons), "stop")
