"""The engine against the model run alone: no cross-talk, exact splits, aborts, queueing, seeds."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import SamplingParams
from megalodon_infer.config import EngineConfig
from megalodon_infer.core.scheduler import AddResult
from megalodon_infer.engine.llm import LLM
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.model.init import random_model
from tests.engine.conftest import TINY, greedy_alone, random_prompts


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; returns request_id -> list of RequestOutputs."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(outputs, index=0) -> list[int]:
    return [t for out in outputs for d in out.outputs if d.index == index for t in d.token_ids]


def test_concurrent_staggered_requests_equal_each_alone(tiny_model):
    """18 requests with different prompt lengths, arriving over time, through 6 slots."""
    engine = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=6, max_num_batched_tokens=20))
    prompts = random_prompts(18, seed=1, vocab=97)
    max_tokens = [5 + (i * 7) % 19 for i in range(18)]
    results: dict[str, list] = {}
    pending = list(range(18))
    step = 0
    while pending or engine.has_unfinished_requests():
        # three new requests every other step: arrivals interleave with prefill and decode
        if step % 2 == 0:
            for i in pending[:3]:
                assert engine.add_request(f"r{i}", prompts[i], SamplingParams(temperature=0,
                                          max_tokens=max_tokens[i])) is AddResult.ADDED
            pending = pending[3:]
        for out in engine.step():
            results.setdefault(out.request_id, []).append(out)
        step += 1
    for i in range(18):
        assert tokens_of(results[f"r{i}"]) == greedy_alone(tiny_model, prompts[i], max_tokens[i]), i
        assert results[f"r{i}"][-1].outputs[-1].finish_reason == "length"
    assert engine.pool.num_free == 6


@pytest.mark.parametrize("budget", [6, 9, 64])
def test_prefill_split_by_budget_equals_unsplit(tiny_model, budget):
    prompts = random_prompts(6, seed=2, vocab=97, max_len=60)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    small = LLM(tiny_model, max_num_seqs=6, max_num_batched_tokens=budget).generate(prompts, params)
    whole = LLM(tiny_model, max_num_seqs=6, max_num_batched_tokens=4096).generate(prompts, params)
    for a, b in zip(small, whole, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la = [lp.logprob for lp in a.outputs[0].logprobs]
        lb = [lp.logprob for lp in b.outputs[0].logprobs]
        assert la == pytest.approx(lb, abs=1e-9)
        assert a.prompt_logprobs[0].logprob is None
        assert [lp.logprob for lp in a.prompt_logprobs[1:]] == pytest.approx(
            [lp.logprob for lp in b.prompt_logprobs[1:]], abs=1e-9)


def test_prompt_logprobs_are_the_models_log_softmax(tiny_model):
    prompt = random_prompts(1, seed=3, vocab=97, max_len=30)[0] + [5] * 10
    result = LLM(tiny_model, max_num_batched_tokens=16).generate(
        [prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    logits, _ = tiny_model(torch.tensor([prompt]), tiny_model.allocate_state(1))
    expected = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert result.outputs[0].token_ids == [] and result.outputs[0].finish_reason == "length"
    assert [lp.logprob for lp in result.prompt_logprobs[1:]] == pytest.approx(expected.tolist(), abs=1e-6)


def test_abort_mid_prefill_and_mid_decode_frees_slots(tiny_model):
    engine = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=4,
                                                      max_waiting_requests=1))
    long_prompt = list(range(1, 60))
    # FCFS: the short prompt arrives first, prefills in one step and decodes while the long one prefills
    engine.add_request("decoding", [3, 4], SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("prefilling", long_prompt, SamplingParams(temperature=0, max_tokens=50))
    engine.add_request("queued", [7, 8, 9], SamplingParams(temperature=0, max_tokens=4))
    assert engine.add_request("overflow", [1], SamplingParams()) is AddResult.OVERLOADED
    seen: dict[str, list] = {}

    def step():
        outs = engine.step()
        for out in outs:
            seen.setdefault(out.request_id, []).append(out)
        return outs

    for _ in range(3):
        step()
    assert engine.scheduler.running["prefilling"].is_prefilling
    assert not engine.scheduler.running["decoding"].is_prefilling
    assert engine.pool.num_free == 0 and engine.scheduler.num_waiting == 1
    engine.abort_request("prefilling")
    outs = step()  # the abort lands, its slot goes to the queued request in the same step
    aborted = [o for o in outs if o.request_id == "prefilling"]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert "queued" in engine.scheduler.running
    engine.abort_request("decoding")
    step()
    assert "decoding" not in engine.requests and "decoding" not in engine.scheduler.running
    for request_id, outs in run_to_completion(engine).items():
        seen.setdefault(request_id, []).extend(outs)
    assert tokens_of(seen["queued"]) == greedy_alone(tiny_model, [7, 8, 9], 4)
    assert engine.pool.num_free == 2


def test_seeded_sampling_is_independent_of_batch_composition(tiny_model):
    prompt = [11, 12, 13, 14, 15]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, logprobs=1)
    alone = LLM(tiny_model, max_num_seqs=8).generate([prompt], params)[0].outputs[0]
    others = random_prompts(7, seed=4, vocab=97)
    mixed_prompts = others[:3] + [prompt] + others[3:]
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=12)] * 3 + [params] + \
                   [SamplingParams(temperature=0.7, seed=i, max_tokens=9) for i in range(4)]
    mixed = LLM(tiny_model, max_num_seqs=8).generate(mixed_prompts, mixed_params)[3].outputs[0]
    assert mixed.token_ids == alone.token_ids
    different_seed = LLM(tiny_model).generate([prompt], SamplingParams(temperature=0.9, top_p=0.95, seed=99,
                                                                        max_tokens=12))[0].outputs[0]
    assert different_seed.token_ids != alone.token_ids


def test_n_choices_share_one_prefill_and_sample_independently(tiny_model):
    engine_llm = LLM(tiny_model, max_num_seqs=4)
    calls = []
    original = engine_llm.engine.runner.prefill
    engine_llm.engine.runner.prefill = lambda *a, **k: calls.append(a) or original(*a, **k)
    params = SamplingParams(temperature=1.0, seed=7, n=4, max_tokens=10)
    result = engine_llm.generate([[1, 2, 3]], params)[0]
    assert len(calls) == 1  # the prompt ran once
    choices = [c.token_ids for c in result.outputs]
    assert len({tuple(c) for c in choices}) == 4
    again = LLM(tiny_model, max_num_seqs=4).generate([[1, 2, 3]], params)[0]
    assert [c.token_ids for c in again.outputs] == choices
    single = LLM(tiny_model).generate([[1, 2, 3]], SamplingParams(temperature=1.0, seed=7, max_tokens=10))[0]
    assert single.outputs[0].token_ids == choices[0]


def test_slot_snapshot_restore_continues_identically(tiny_model):
    engine = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=3))
    prompt = list(range(20, 39))
    expected = greedy_alone(tiny_model, prompt, 15)
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=15))
    produced = []
    while len(produced) < 6:
        for out in engine.step():
            produced += out.outputs[0].token_ids
    slot = engine.scheduler.running["a"].slot_ids[0]
    snap = engine.pool.snapshot(slot)
    other = engine.pool.alloc()
    engine.pool.restore(snap, other)
    # continue from the copy by hand: feed the last token, argmax, repeat
    logits, _ = tiny_model(torch.tensor([[produced[-1]]]), engine.pool.state, slot_ids=torch.tensor([other]))
    cont = []
    for _ in range(15 - len(produced)):
        cont.append(int(logits[0, -1].argmax()))
        logits, _ = tiny_model(torch.tensor([[cont[-1]]]), engine.pool.state, slot_ids=torch.tensor([other]))
    assert produced + cont == expected
    assert snap.position == len(prompt) + 5  # the snapshot itself did not move
    rest = run_to_completion(engine)
    assert produced + tokens_of(rest["a"]) == expected


def test_a_failing_request_does_not_touch_others(tiny_model):
    engine = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=4))
    original = engine.runner.prefill

    def flaky(slot_id, tokens, all_logits):
        if tokens[0] == 96:
            raise RuntimeError("boom")
        return original(slot_id, tokens, all_logits)

    engine.runner.prefill = flaky
    engine.add_request("bad", [96, 1, 2], SamplingParams(temperature=0, max_tokens=5))
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5))
    results = run_to_completion(engine)
    assert results["bad"][-1].error and results["bad"][-1].outputs[0].finish_reason == "error"
    assert tokens_of(results["good"]) == greedy_alone(tiny_model, [5, 6, 7], 5)
    assert engine.pool.num_free == 4


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "at least one token"),
    ([97], SamplingParams(), "token ids"),
    (list(range(50)), SamplingParams(max_tokens=60), "maximum context length"),
    ([1], SamplingParams(n=9), "max_num_seqs"),
    ([1], SamplingParams(logit_bias={500: 1.0}), "logit_bias"),
])
def test_invalid_requests_are_refused_up_front(tiny_model, prompt, params, match):
    engine = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=8, max_model_len=100))
    with pytest.raises(ValueError, match=match):
        engine.add_request("x", prompt, params)
    assert not engine.has_unfinished_requests()


def test_pool_refuses_a_configuration_over_its_memory_limit(tiny_model):
    from megalodon_infer.core.state_pool import PoolMemoryError

    per_slot = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=1)).pool.bytes_per_slot
    with pytest.raises(PoolMemoryError, match="at most 3 slots would fit"):
        LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=8, state_memory_limit_bytes=per_slot * 3 + 5))


def test_a_failure_while_sampling_one_request_ends_it_alone(tiny_model):
    """A request whose sampling state is broken (here: a logit_bias id past the vocabulary, as a bad
    per-request tensor would be) fails alone; the others sample exactly what they sample alone."""
    prompts = random_prompts(3, seed=8, vocab=97)
    params = [SamplingParams(temperature=0.8, seed=10 + i, max_tokens=8, repetition_penalty=1.1) for i in range(3)]
    alone = [LLM(tiny_model).generate([p], q)[0].outputs[0].token_ids for p, q in zip(prompts, params, strict=True)]
    engine = LLMEngine(tiny_model, None, EngineConfig(max_num_seqs=4))
    for i, (prompt, param) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, param)
    engine.requests["r1"].choices[0].bias_ids = [10**6]  # breaks r1's row of the batched sampler
    results = run_to_completion(engine)
    assert results["r1"][-1].error and "sampling failed" in results["r1"][-1].error
    assert results["r1"][-1].outputs[0].finish_reason == "error"
    assert tokens_of(results["r0"]) == alone[0] and tokens_of(results["r2"]) == alone[2]
    assert engine.pool.num_free == 4 and not engine.requests


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_per_request_tensors_live_on_the_model_device(tiny_model, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (scripts/gpu_check.sh runs it)")
    model = tiny_model.to(device) if device != "cpu" else tiny_model
    try:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, prefix_cache_bytes=1 << 20, cuda_graphs=False))
        params = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=6, repetition_penalty=1.2,
                                frequency_penalty=0.3, logit_bias={5: 1.0})
        engine.add_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], params)
        engine.step()
        for choice in engine.requests["a"].choices:
            assert choice.generator.device.type == device
            assert choice.seen_mask.device.type == device and choice.output_counts.device.type == device
        run_to_completion(engine)
        engine.add_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(temperature=0.5, seed=1, max_tokens=3))
        out = run_to_completion(engine)["b"]
        assert out[-1].num_cached_tokens == 9 and not out[-1].error  # the stored prompt state, whole
    finally:
        if device != "cpu":
            tiny_model.to("cpu")


def test_an_eager_decode_step_reads_one_value_back_from_the_device(tiny_model, monkeypatch):
    """The whole engine step (scheduler, fused decode, sampling with penalties, outputs) reads device
    values on the host once: the sampled ids. On a GPU each read is a sync."""
    model = random_model(TINY, seed=5)  # float32: the fused kernels' dtype
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=4, kernels="fused", prefix_cache_bytes=1 << 20))
    for i in range(3):
        engine.add_request(f"r{i}", [1 + i, 2, 3], SamplingParams(temperature=0.7, seed=i, top_p=0.9, max_tokens=40,
                                                                repetition_penalty=1.1, frequency_penalty=0.2))
    for _ in range(2):
        engine.step()  # prefill, then the first decode
    assert engine.runner.decode_backend == "fused" and not engine.scheduler.waiting
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n)
                            or _o(self, *a, **k))
    for _ in range(12):  # crosses a chunk boundary (C = 8): boundary snapshots included
        before = len(reads)
        outputs = engine.step()
        assert len(reads) - before <= 1, reads[before:]
        assert sum(len(o.outputs[0].token_ids) for o in outputs) == 3
