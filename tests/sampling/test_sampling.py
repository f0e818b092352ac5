"""Behaviour of the sampler that requests rely on: reproducibility, filters, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer.sample.logprobs import PromptLogprobsBuilder, token_logprobs
from megalodon_infer.sample.params import SamplingParams
from megalodon_infer.sample.sampler import SampleOutput, SequenceSamplingState, filter_logits, process_logits, sample

VOCAB = 32


def make_state(
    vocab: int = VOCAB, eos_id: int | None = None, prompt: tuple[int, ...] = (1,), **params: object
) -> SequenceSamplingState:
    return SequenceSamplingState(SamplingParams(max_tokens=None, **params), list(prompt), vocab, eos_id)


def update_after_sample(states: list[SequenceSamplingState], output: SampleOutput) -> None:
    for state, token_id in zip(states, output.token_ids, strict=True):
        state.append_token(token_id)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int, splits: tuple[int, ...] = ()):
    """Score `prompt` from the logits of its positions, fed to the builder in segments cut at `splits`."""
    builder = PromptLogprobsBuilder(prompt, k)
    cuts = [0, *splits, len(prompt)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        builder.add_segment(start, logits[start:end])
    return builder.entries


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# A toy "model": the next logits depend on the last token, so one changed draw changes the future.
TRANSITIONS = random_logits(VOCAB, seed=99, scale=1.5)


def generate(states: list[SequenceSamplingState], steps: int) -> list[list[int]]:
    """Run `steps` decode steps over the batch; returns each row's output ids."""
    for _ in range(steps):
        last_ids = torch.tensor([(s.output_ids or s.prompt_ids)[-1] for s in states])
        update_after_sample(states, sample(TRANSITIONS[last_ids], states))
    return [s.output_ids for s in states]


def kept_ids(logits_row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits_row).nonzero().flatten().tolist())


def test_greedy_is_argmax_and_consumes_no_randomness() -> None:
    logits = random_logits(4)
    states = [make_state(temperature=0.0, seed=s) for s in (1, 2, None)] + [make_state(temperature=0.0)]
    before = [s.generator.get_state() for s in states]
    out = sample(logits, states)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    for state, state_before in zip(states, before, strict=True):
        assert torch.equal(state.generator.get_state(), state_before)


def test_seeded_stream_does_not_depend_on_batch_composition() -> None:
    target = dict(seed=1234, temperature=0.9, top_k=20, top_p=0.95, min_p=0.02, logprobs=3)
    others = [
        dict(temperature=1.0),
        dict(temperature=0.0),
        dict(temperature=1.7, top_k=5, seed=5),
        dict(temperature=0.5, top_p=0.5),
        dict(temperature=1.2, repetition_penalty=1.3, frequency_penalty=0.5),
        dict(temperature=1.0, min_p=0.3, logprobs=1),
        dict(temperature=0.8, seed=1234),
    ]
    alone = make_state(**target)
    generate([alone], steps=24)
    for position in (0, 3, 7):
        mixed = [make_state(**params) for params in others]
        mixed.insert(position, make_state(**target))
        generate(mixed, steps=24)
        assert mixed[position].output_ids == alone.output_ids
    # Logprobs are deterministic too: replay the lone stream and compare with a mixed replay.
    solo, batch = make_state(**target), [make_state(**p) for p in others]
    batch.insert(3, make_state(**target))
    last_solo, last_batch = [1], [1] * 8
    for _ in range(5):
        out_solo = sample(TRANSITIONS[last_solo], [solo])
        out_batch = sample(TRANSITIONS[last_batch], batch)
        assert out_batch.token_ids[3] == out_solo.token_ids[0]
        assert out_batch.logprobs[3] == out_solo.logprobs[0]
        update_after_sample([solo], out_solo)
        update_after_sample(batch, out_batch)
        last_solo, last_batch = out_solo.token_ids, out_batch.token_ids


def test_same_seed_repeats_and_different_seeds_differ() -> None:
    first, again, other = (make_state(seed=s, temperature=1.0) for s in (7, 7, 8))
    generate([first], steps=32)
    generate([again], steps=32)
    generate([other], steps=32)
    assert first.output_ids == again.output_ids
    assert first.output_ids != other.output_ids


def test_top_k_one_is_greedy_even_on_ties() -> None:
    logits = random_logits(8)
    logits[2, 5] = logits[2, 9] = logits[2].max() + 1.0  # a tie: greedy takes the lower id
    states = [make_state(temperature=1.5, top_k=1, seed=row) for row in range(8)]
    assert sample(logits, states).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_the_k_largest() -> None:
    logits = random_logits(6, vocab=16)
    ks = [1, 2, 3, 7, 15, -1]
    filtered = filter_logits(logits, ks, [1.0] * 6, [0.0] * 6)
    for row, k in enumerate(ks):
        expected = set(logits[row].topk(k if k > 0 else 16).indices.tolist())
        assert kept_ids(filtered[row]) == expected
        kept = torch.isfinite(filtered[row])
        assert torch.equal(filtered[row][kept], logits[row][kept])


def manual_top_p(row: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(row.double(), dim=-1)
    order = probs.argsort(descending=True).tolist()
    mass = 0.0
    kept = set()
    for token in order:
        kept.add(token)
        mass += probs[token].item()
        if mass >= p:
            break
    return kept


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    rows = 64
    logits = random_logits(rows, vocab=12, seed=3)
    top_p = torch.rand(rows, generator=torch.Generator().manual_seed(4)).clamp(min=0.01).tolist()
    top_p[0] = 1.0
    filtered = filter_logits(logits, [-1] * rows, top_p, [0.0] * rows)
    for row in range(rows):
        assert kept_ids(filtered[row]) == manual_top_p(logits[row], top_p[row]), f"row {row}"
    assert kept_ids(filtered[0]) == set(range(12))


def test_top_p_is_measured_after_top_k() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # Without top-k, 0.6 needs the top 2 (0.7). Renormalized over the top 3 (0.44, 0.33, 0.22),
    # it still needs 2; at p=0.8 it needs all 3 of the top-k set, never the 4th token.
    assert kept_ids(filter_logits(logits, [3], [0.6], [0.0])[0]) == {0, 1}
    assert kept_ids(filter_logits(logits, [3], [0.8], [0.0])[0]) == {0, 1, 2}
    assert kept_ids(filter_logits(logits, [-1], [0.95], [0.0])[0]) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    rows = 32
    logits = random_logits(rows, vocab=12, seed=5)
    min_p = torch.rand(rows, generator=torch.Generator().manual_seed(6)).tolist()
    min_p[0] = 0.0
    filtered = filter_logits(logits, [-1] * rows, [1.0] * rows, min_p)
    for row in range(rows):
        probs = torch.softmax(logits[row].double(), dim=-1)
        expected = set((probs >= min_p[row] * probs.max()).nonzero().flatten().tolist())
        assert kept_ids(filtered[row]) == expected, f"row {row}"
    assert kept_ids(filtered[0]) == set(range(12))


def expected_distribution(logits: torch.Tensor, temperature: float, keep: list[int]) -> torch.Tensor:
    scaled = logits.double() / temperature
    mask = torch.full_like(scaled, float("-inf"))
    mask[keep] = 0.0
    return torch.softmax(scaled + mask, dim=-1)


@pytest.mark.parametrize(
    ("temperature", "knobs", "keep"),
    [
        (0.7, {}, [0, 1, 2, 3, 4, 5]),
        (2.0, {}, [0, 1, 2, 3, 4, 5]),
        (1.3, {"top_k": 3}, [0, 1, 2]),
        # At T=1 the probabilities are about .40 .24 .17 .11 .06 .03, with running mass .40 .63
        # .80 .91: top_p .85 needs the first 4; min_p .25 keeps those at >= .1 (ratio .27 and up).
        (1.0, {"top_p": 0.85}, [0, 1, 2, 3]),
        (1.0, {"min_p": 0.25}, [0, 1, 2, 3]),
    ],
)
def test_draws_follow_the_filtered_softmax(temperature: float, knobs: dict, keep: list[int]) -> None:
    logits = torch.tensor([2.0, 1.5, 1.15, 0.7, 0.1, -0.6])
    num_rows, num_steps = 4000, 5
    states = [make_state(vocab=6, seed=seed, temperature=temperature, **knobs) for seed in range(num_rows)]
    counts = torch.zeros(6, dtype=torch.float64)
    for _ in range(num_steps):
        drawn = torch.tensor(sample(logits.expand(num_rows, 6), states).token_ids)
        counts += torch.bincount(drawn, minlength=6).double()
    expected = expected_distribution(logits, temperature, keep) * num_rows * num_steps
    outside = [t for t in range(6) if t not in keep]
    assert counts[outside].sum() == 0
    # Chi-square over the kept tokens; 30 is far in the tail for <= 5 degrees of freedom.
    chi_square = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi_square < 30.0, (counts.tolist(), expected.tolist())


def test_repetition_penalty_shrinks_seen_logits_toward_zero() -> None:
    state = make_state(vocab=8, prompt=(1, 2), repetition_penalty=2.0)
    state.append_token(3)
    logits = torch.tensor([[1.0, 4.0, -3.0, 2.5, 6.0, -1.0, 0.0, 0.5]])
    # Seen: 1 and 2 (prompt), 3 (output). Positive logits are divided, negative ones multiplied.
    expected = torch.tensor([[1.0, 2.0, -6.0, 1.25, 6.0, -1.0, 0.0, 0.5]])
    torch.testing.assert_close(process_logits(logits, [state]), expected)


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.5, 0.0]])
    assert sample(logits, [make_state(vocab=4, prompt=(1,), temperature=0.0)]).token_ids == [1]
    penalized = make_state(vocab=4, prompt=(1,), temperature=0.0, repetition_penalty=1.5)
    assert sample(logits, [penalized]).token_ids == [2]


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    state = make_state(vocab=8, prompt=(3, 5), frequency_penalty=0.5, presence_penalty=0.25)
    for token in (3, 3, 4):
        state.append_token(token)
    logits = random_logits(1, vocab=8)
    processed = process_logits(logits, [state])
    expected = logits.clone()
    expected[0, 3] -= 2 * 0.5 + 0.25
    expected[0, 4] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(processed, expected)


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = random_logits(200, seed=8)
    logits[:, 6] = 8.0  # token 6 would win nearly every draw
    banned = [make_state(seed=s, logit_bias={6: -100.0}) for s in range(200)]
    assert 6 not in sample(logits, banned).token_ids
    forced = [make_state(seed=s, logit_bias={11: 100.0}) for s in range(200)]
    assert set(sample(logits, forced).token_ids) == {11}
    assert sample(logits[:1], [make_state(temperature=0.0, logit_bias={11: 100.0})]).token_ids == [11]


def test_min_tokens_suppresses_eos_and_stop_token_ids() -> None:
    logits = torch.tensor([[10.0, 9.0, 1.0, 2.0, 0.0]])  # EOS (0), then stop id 1, dominate
    state = make_state(vocab=5, eos_id=0, temperature=0.0, min_tokens=3, stop_token_ids=[1])
    chosen = []
    for _ in range(4):
        out = sample(logits, [state])
        update_after_sample([state], out)
        chosen.extend(out.token_ids)
    assert chosen == [3, 3, 3, 0]


def test_min_tokens_with_ignore_eos_leaves_eos_allowed() -> None:
    logits = torch.tensor([[10.0, 11.0, 1.0, 2.0, 0.0]])
    state = make_state(vocab=5, eos_id=0, temperature=0.0, min_tokens=3, stop_token_ids=[1], ignore_eos=True)
    assert sample(logits, [state]).token_ids == [0]


def test_logprobs_come_from_raw_logits_and_are_sorted() -> None:
    logits = random_logits(3, seed=9)
    raw = logits.clone()
    states = [
        make_state(seed=1, temperature=0.5, repetition_penalty=1.8, logit_bias={4: 5.0}, logprobs=5),
        make_state(temperature=0.0, frequency_penalty=1.0, logprobs=0),
        make_state(seed=2),
    ]
    out = sample(logits, states)
    assert torch.equal(logits, raw)  # the caller's logits are not modified
    expected = torch.log_softmax(raw.double(), dim=-1)
    assert out.logprobs[0].logprob == pytest.approx(expected[0, out.token_ids[0]].item(), abs=1e-5)
    assert out.logprobs[1].logprob == pytest.approx(expected[1, out.token_ids[1]].item(), abs=1e-5)
    assert out.logprobs[2] is None
    assert out.logprobs[1].top == []
    assert [lp.token_id for lp in out.logprobs[:2]] == out.token_ids[:2]
    top = out.logprobs[0].top
    assert [token for token, _ in top] == expected[0].topk(5).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    for token, lp in top:
        assert lp == pytest.approx(expected[0, token].item(), abs=1e-5)


def test_prompt_logprobs_score_each_token_given_its_prefix() -> None:
    prompt = [3, 17, 0, 17, 31, 8]
    logits = random_logits(len(prompt), seed=10)  # the last row predicts a generated token
    scored = prompt_logprobs(logits, prompt, k=2)
    assert [entry.token_id for entry in scored] == prompt
    assert scored[0].logprob is None and scored[0].top is None
    expected = torch.log_softmax(logits.double(), dim=-1)
    for i in range(1, len(prompt)):
        assert scored[i].logprob == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-5)
        top = scored[i].top
        assert [token for token, _ in top] == expected[i - 1].topk(2).indices.tolist()
        assert top[0][1] >= top[1][1]
    assert [entry.logprob for entry in prompt_logprobs(logits[:1], [5], k=1)] == [None]


def test_prompt_logprobs_split_into_segments_match_one_pass() -> None:
    prompt = torch.randint(0, VOCAB, (1200,), generator=torch.Generator().manual_seed(11)).tolist()
    logits = random_logits(len(prompt), seed=12)
    whole = prompt_logprobs(logits, prompt, k=1)
    # Chunked prefill: the segment [0, 700) scores prompt[1:700] and carries its last row over to
    # score prompt[700]; any split gives the one-pass entries.
    for splits in ((700,), (1, 2, 513, 1199), tuple(range(64, 1200, 64))):
        assert prompt_logprobs(logits, prompt, k=1, splits=splits) == whole
    assert whole[1:] == token_logprobs(logits[:-1], prompt[1:], k=1)


def test_unseeded_request_can_be_replayed_from_its_drawn_seed() -> None:
    first = make_state(temperature=1.0)
    replay = make_state(temperature=1.0, seed=first.seed)
    assert generate([first], 16) == generate([replay], 16)


def test_batch_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        sample(random_logits(2), [make_state()])
    with pytest.raises(ValueError, match="V="):
        sample(random_logits(1, vocab=VOCAB + 1), [make_state()])
