"""One step's sampling: every row that needs a token this step, sampled in one batched call.

Owns the isolation rule: when the batched call fails, the rows are sampled again request by
request, so a failure (a bad per-request tensor, a device error in one request's generator) ends
that request alone and every other request gets exactly the token the batched call would have
given (each row's draws come from its own generator, whatever the batch). Also records the step's
time-to-first-token and inter-token latencies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megalodon_infer.engine.request import Choice, Request
from megalodon_infer.engine.stats import IterationStats
from megalodon_infer.sample.sampler import SampleOutput, sample

logger = logging.getLogger(__name__)


@dataclass
class SamplingStep:
    """Rows added with `add`, sampled by `run`. `num_untokenizable` trailing logits are masked:
    ids of a padded embedding table that the tokenizer cannot decode."""

    num_untokenizable: int = 0
    rows: list[tuple[Request, Choice, Tensor]] = field(default_factory=list)
    # choices that finished in this step, with the logits their last token was sampled from
    finished: list[tuple[Request, Choice, Tensor]] = field(default_factory=list)

    def begin(self) -> None:
        self.rows, self.finished = [], []

    def add(self, request: Request, choice: Choice, logits: Tensor) -> None:
        """logits: [V] the distribution of the choice's next token."""
        self.rows.append((request, choice, logits))

    def run(self, stats: IterationStats) -> list[tuple[Request, str]]:
        """Sample every row and append the tokens; returns the requests that failed, with why."""
        if not self.rows:
            return []
        failures: list[tuple[Request, str]] = []
        logits = torch.stack([row[2] for row in self.rows])
        if self.num_untokenizable:
            logits[:, -self.num_untokenizable:] = float("-inf")
        choices = [row[1] for row in self.rows]
        # a failed batched call may have drawn some rows' noise already: rewind before the retry
        generator_states = [(c.generator, c.generator.get_state()) for c in choices if not c.is_greedy]
        try:
            groups = [(list(range(len(self.rows))), sample(logits, choices))]
        except Exception:  # noqa: BLE001 - isolate the request that caused it, below
            logger.exception("batched sampling failed; sampling request by request")
            for generator, state in generator_states:
                generator.set_state(state)
            groups = []
            for request, indices in self._rows_by_request().items():
                try:
                    groups.append((indices, sample(logits[indices], [self.rows[i][1] for i in indices])))
                except Exception as exc:  # noqa: BLE001 - this request ends, the others go on
                    logger.exception("sampling failed for request %s", request.request_id)
                    failures.append((request, f"sampling failed: {exc}"))
        now = time.monotonic()
        for indices, sampled in groups:
            failures.extend(self._append(indices, sampled, logits, now, stats))
        stats.num_generation_tokens += sum(len(indices) for indices, _ in groups)
        return failures

    def _rows_by_request(self) -> dict[Request, list[int]]:
        grouped: dict[Request, list[int]] = {}
        for i, (request, _, _) in enumerate(self.rows):
            grouped.setdefault(request, []).append(i)
        return grouped

    def _append(self, indices: list[int], sampled: SampleOutput, logits: Tensor, now: float,
                stats: IterationStats) -> list[tuple[Request, str]]:
        timed: set[str] = set()
        failed: dict[Request, str] = {}
        for j, i in enumerate(indices):
            request, choice, _ = self.rows[i]
            if request in failed:
                continue
            if request.request_id not in timed:  # one latency sample per request and step
                timed.add(request.request_id)
                previous = request.metrics.last_token_time
                if previous is None:
                    stats.time_to_first_tokens_s.append(max(0.0, now - request.metrics.arrival_time))
                else:
                    stats.inter_token_latencies_s.append(now - previous)
            try:
                request.append_token(choice, sampled.token_ids[j], sampled.logprobs[j], now)
            except Exception as exc:  # noqa: BLE001 - e.g. detokenizing: this request ends, the others go on
                logger.exception("handling the token of request %s failed", request.request_id)
                failed[request] = f"output processing failed: {exc}"
                continue
            if choice.finish_reason is not None:
                self.finished.append((request, choice, logits[i]))
        if failed:
            self.finished = [row for row in self.finished if row[0] not in failed]
        return list(failed.items())
