"""The serving engine on the model's device: seeded sampling with penalties, n > 1, the prefix cache's
device and host tiers, sessions, and CUDA-graph decode against eager decode.

Every test but the CUDA-graph ones runs on the CPU too (`[cpu]`), so its logic is held on every run;
the `[cuda]` parameters are marked `gpu` and skipped without a CUDA device (scripts/gpu_check.sh runs
them on the GPU machine). The model is float32 with the fused decode kernels: the serving path (on a
GPU with CUDA graphs replaying decode).

NOTE: greedy equality across batch compositions. Batched float32 logits are not bitwise equal to
those of the same request alone (other GEMM shapes, another split plan in the attention kernel), so
two greedy runs may part where the reference's two best tokens are tied to rounding.
`assert_same_tokens` accepts a first divergence only there (top-2 logprob gap <= NEAR_TIE); anything
else fails. The prefix cache may also cut a prefill into other segments than a cold run does (where a
prompt leaves a cached path), so cache on/off agree to rounding (`assert_close_outputs`). Where both
runs restore the same snapshot (from either tier, or from a session file), tokens and logprobs must be
exactly equal.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig, SamplingParams
from megalodon_infer.config import EngineConfig
from megalodon_infer.core.scheduler import AddResult
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.engine.outputs import CompletionOutput, RequestOutput
from megalodon_infer.model.init import random_model

CFG = ModelConfig(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=8,
                  norm_num_groups=4, vocab_size=97, chunk_size=16)
C = CFG.chunk_size
NO_CUDA = "needs a CUDA device; scripts/gpu_check.sh runs it on the GPU machine"
NEAR_TIE = 1e-3  # the largest top-2 logprob gap at which two float32 greedy runs may part
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])
SAMPLED = dict(temperature=0.8, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3,
               logit_bias={5: 3.0, 11: -100.0})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, OpenMP regions of these tiny matmuls otherwise wait at
    their barriers for a descheduled peer (worker/resources.py), which costs more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["cpu", CUDA])
def model(request: pytest.FixtureRequest):
    return random_model(CFG, seed=11, dtype=torch.float32, device=request.param)


def make_engine(model, *, cache_bytes: int = 0, host_bytes: int = 0, max_num_seqs: int = 8, budget: int = 64,
                graphs: bool = True) -> LLMEngine:
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, prefix_cache_bytes=cache_bytes,
        prefix_cache_host_bytes=host_bytes, cuda_graphs=graphs, kernels="fused"))
    assert engine.runner.decode_backend == "fused"
    if graphs and model.device.type == "cuda":
        assert engine.runner.graphs is not None and engine.runner.graphs.captured_buckets, "no graph was captured"
    return engine


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams, int]]) -> dict[str, RequestOutput]:
    """Add each (id, prompt, params, arrival step) at its step and run until idle; merged outputs by id."""
    pending = sorted(requests, key=lambda r: r[3])
    parts: dict[str, list[RequestOutput]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][3] <= step:
            request_id, prompt, params, _ = pending.pop(0)
            assert engine.add_request(request_id, prompt, params) is AddResult.ADDED
        for out in engine.step():
            parts.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 5000, "the engine did not finish"
    merged = {request_id: RequestOutput.merged(outs) for request_id, outs in parts.items()}
    for request_id, out in merged.items():
        assert out.finished and out.error is None, (request_id, out.error)
    assert engine.pool.num_free == engine.pool.num_slots
    return merged


def alone(model, prompt: list[int], params: SamplingParams, **engine_options) -> RequestOutput:
    return run(make_engine(model, **engine_options), [("alone", prompt, params, 0)])["alone"]


def prompts(count: int, seed: int, max_len: int = 2 * C + 9) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def assert_same_tokens(got: CompletionOutput, ref: CompletionOutput, what: str) -> None:
    """Equal greedy tokens, or a first divergence at a near-tie of `ref` (which must carry logprobs >= 2)."""
    if got.token_ids == ref.token_ids:
        return
    assert len(got.token_ids) == len(ref.token_ids), what
    i = next(i for i, (a, b) in enumerate(zip(got.token_ids, ref.token_ids, strict=True)) if a != b)
    top = dict(ref.logprobs[i].top) if ref.logprobs else {}
    gap = top.get(ref.token_ids[i], float("inf")) - top.get(got.token_ids[i], float("-inf"))
    assert gap <= NEAR_TIE, f"{what}: token {i} is {got.token_ids[i]}, reference {ref.token_ids[i]} (gap {gap:.2e})"


def assert_close_outputs(got: RequestOutput, ref: RequestOutput, what: str, atol: float = 1e-4) -> None:
    """Every choice: the same tokens (to near-ties), and logprobs within `atol` up to any divergence."""
    assert len(got.outputs) == len(ref.outputs), what
    for choice, expected in zip(got.outputs, ref.outputs, strict=True):
        assert_same_tokens(choice, expected, what)
        for a, b in zip(choice.logprobs or [], expected.logprobs or [], strict=True):
            if a.token_id != b.token_id:
                break
            assert abs(a.logprob - b.logprob) <= atol, (what, a, b)


def assert_identical(got: RequestOutput, ref: RequestOutput, what: str) -> None:
    """Same tokens and bitwise-same logprobs for every choice."""
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in ref.outputs], what
    assert [c.logprobs for c in got.outputs] == [c.logprobs for c in ref.outputs], what


def test_seeded_sampling_with_penalties_and_logit_bias_is_reproducible_and_independent_of_the_batch(model):
    target = ("target", prompts(1, seed=1)[0], SamplingParams(seed=1234, max_tokens=24, **SAMPLED), 2)
    first = alone(model, target[1], target[2])
    again = alone(model, target[1], target[2])
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert len(first.outputs[0].token_ids) == 24 and 11 not in first.outputs[0].token_ids  # bias -100: never
    # the same request among others: greedy rows, other seeds and penalties, arriving before and after it
    others = [(f"o{i}", p, SamplingParams(temperature=0.0 if i % 2 else 1.1, seed=i, max_tokens=5 + 4 * i,
                                          repetition_penalty=1.0 + 0.1 * i, logit_bias={i: float(i)}), i)
              for i, p in enumerate(prompts(6, seed=2))]
    engine = make_engine(model)
    mixed = run(engine, [*others, target])
    assert mixed["target"].outputs[0].token_ids == first.outputs[0].token_ids
    # a second seed draws something else (the seed is what the tokens depend on)
    other_seed = alone(model, target[1], SamplingParams(seed=4321, max_tokens=24, **SAMPLED))
    assert other_seed.outputs[0].token_ids != first.outputs[0].token_ids


def test_per_request_sampling_tensors_live_on_the_model_device(model):
    engine = make_engine(model)
    engine.add_request("r", prompts(1, seed=3)[0], SamplingParams(n=2, seed=5, max_tokens=4, **SAMPLED))
    engine.step()
    for choice in engine.requests["r"].choices:
        assert choice.generator.device.type == model.device.type
        assert choice.output_counts.device == model.device and choice.seen_mask.device == model.device
    assert engine.runner.decode(list(engine.requests["r"].slot_ids), [1, 2]).device == model.device
    engine.abort_request("r")
    engine.step()


def test_n_choices_replay_single_requests_with_consecutive_seeds(model):
    prompt = prompts(1, seed=4)[0]
    many = alone(model, prompt, SamplingParams(n=3, seed=77, max_tokens=20, **SAMPLED))
    assert [c.index for c in many.outputs] == [0, 1, 2]
    for i, choice in enumerate(many.outputs):
        single = alone(model, prompt, SamplingParams(seed=77 + i, max_tokens=20, **SAMPLED))
        assert choice.token_ids == single.outputs[0].token_ids, i
    assert len({tuple(c.token_ids) for c in many.outputs}) == 3
    # greedy n = 2 from one prefill (slot copies), with the prefix cache on: both choices are the n = 1 answer
    greedy = SamplingParams(temperature=0.0, max_tokens=20, logprobs=2)
    two = alone(model, prompt, SamplingParams(n=2, temperature=0.0, max_tokens=20, logprobs=2), cache_bytes=1 << 20)
    one = alone(model, prompt, greedy)
    assert_same_tokens(two.outputs[1], two.outputs[0], "n=2 greedy: choice 1 vs choice 0")
    assert_same_tokens(two.outputs[0], one.outputs[0], "n=2 greedy vs n=1")


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    """Prompts sharing 5 (inside a chunk), C (a boundary) and 2C + 3 (two chunks) tokens; then one prompt twice."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, CFG.vocab_size, (3 * C,), generator=g).tolist()
    out = []
    for shared in (5, C, 2 * C + 3, 2 * C + 3, C, 3 * C):
        tail = torch.randint(0, CFG.vocab_size, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        out.append(base[:shared] + tail.tolist())
    return [*out, list(base), list(base)]


def one_by_one(engine: LLMEngine, prompt_list: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    return [run(engine, [(f"r{i}", p, q, 0)])[f"r{i}"] for i, (p, q) in enumerate(zip(prompt_list, params,
                                                                                         strict=True))]


def test_prefix_cache_device_tier_restores_exactly_and_reports_cached_tokens(model):
    prompt_list = shared_prefix_prompts(seed=5)
    params = [SamplingParams(temperature=0.0, max_tokens=9, logprobs=2) if i % 2 else
              SamplingParams(seed=i, max_tokens=9, logprobs=2, **SAMPLED) for i in range(len(prompt_list))]
    params[-1] = params[-2]  # the same prompt twice, with the same seed
    off = one_by_one(make_engine(model, cache_bytes=0), prompt_list, params)
    engine = make_engine(model, cache_bytes=1 << 22)
    on = one_by_one(engine, prompt_list, params)
    for i, (got, ref) in enumerate(zip(on, off, strict=True)):
        assert_close_outputs(got, ref, f"prompt {i}")
    assert_identical(on[-1], on[-2], "the same prompt again, found whole")  # one snapshot and its logits
    cached = [out.num_cached_tokens for out in on]
    assert cached[0] == 0 and cached[2] >= C and cached[3] >= 2 * C and cached[4] >= C and cached[5] >= 2 * C
    assert cached[-2] == cached[-1] == 3 * C  # whole prompts: nothing left to prefill
    assert all(n <= len(prompt) for n, prompt in zip(cached, prompt_list, strict=True))
    assert engine.prefix_cache.stats.hit_tokens == sum(cached)
    entries = engine.prefix_cache._entries
    assert entries and not any(e.on_host for e in entries)
    for entry in entries:
        assert all(t.device == model.device for t in entry.snapshot.tensors().values())


def test_prefix_cache_evicts_to_the_host_tier_and_restores_from_it(model):
    first = make_engine(model, cache_bytes=1 << 22)
    run(first, [("probe", list(range(C)), SamplingParams(max_tokens=1, temperature=0.0), 0)])
    boundary = next(iter(first.prefix_cache._entries)).nbytes  # one boundary snapshot with its logits
    g = torch.Generator().manual_seed(6)
    chain, b, c = (torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (3 * C + 4, 2 * C + 1, C + 5))
    resume = chain[:3 * C] + [7, 8, 9]
    params = SamplingParams(temperature=0.0, max_tokens=7, logprobs=2)
    sampled = SamplingParams(seed=9, max_tokens=7, logprobs=2, **SAMPLED)
    # the same requests with a roomy device tier: the resumed request restores the same snapshot from it
    roomy = make_engine(model, cache_bytes=1 << 22)
    on_device = one_by_one(roomy, [chain, b, c, resume, resume], [params, params, params, params, sampled])
    # a device tier of about three boundary snapshots: the chain's boundaries go down to the host as b and c arrive
    engine = make_engine(model, cache_bytes=3 * boundary + boundary // 2, host_bytes=1 << 22)
    cache = engine.prefix_cache
    outs = one_by_one(engine, [chain, b, c], [params] * 3)
    assert cache.stats.evictions > 0 and cache.num_entries(on_host=True) > 0
    assert cache.stored_bytes(on_host=False) <= cache.device_bytes
    for entry in cache._entries:
        devices = {t.device.type for t in entry.snapshot.tensors().values()}
        assert devices == {"cpu" if entry.on_host else model.device.type}, (entry.num_tokens, entry.on_host)
    hit = cache.lookup(resume)
    assert hit is not None and hit.num_tokens == 3 * C and hit.entry.on_host, "the chain should be on the host tier"
    assert all(t.device == model.device for t in cache.restore_snapshot(hit).tensors().values())
    resumed = [run(engine, [(f"resume{i}", resume, q, 0)])[f"resume{i}"] for i, q in enumerate((params, sampled))]
    # the first from the host tier's boundary; the second finds the whole prompt the first left behind
    assert [out.num_cached_tokens for out in resumed] == [out.num_cached_tokens for out in on_device[3:]]
    assert resumed[0].num_cached_tokens == 3 * C
    for i, (got, ref) in enumerate(zip([*outs, *resumed], on_device, strict=True)):
        assert_identical(got, ref, f"request {i}: host tier vs device tier")
    cold = alone(model, resume, params)
    assert_close_outputs(resumed[0], cold, "restored from the host tier vs computed")


def test_session_saved_and_loaded_on_the_device_resumes_exactly(model, tmp_path):
    engine = make_engine(model, cache_bytes=1 << 22)
    convo = prompts(1, seed=7, max_len=2 * C + 3)[0] + list(range(2 * C + 3))
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    reply = run(engine, [("t1", convo, params, 0)])["t1"].outputs[0].token_ids
    saved = engine.save_session("chat-1", convo + reply, tmp_path)
    assert saved == len(convo) + len(reply) - 1 and (tmp_path / "chat-1.safetensors").is_file()
    fresh = make_engine(model, cache_bytes=1 << 22)  # a restart: an empty cache, the same weights
    assert fresh.load_session("chat-1", tmp_path) == saved
    (entry,) = fresh.prefix_cache._entries
    assert all(t.device == model.device for t in entry.snapshot.tensors().values())
    nxt = convo + reply + [50, 51, 52]
    resumed = run(fresh, [("t2", nxt, SamplingParams(seed=3, max_tokens=8, logprobs=2, **SAMPLED), 0)])["t2"]
    original = run(engine, [("t2", nxt, SamplingParams(seed=3, max_tokens=8, logprobs=2, **SAMPLED), 0)])["t2"]
    assert resumed.num_cached_tokens == original.num_cached_tokens == saved
    assert_identical(resumed, original, "the loaded session vs the state it was saved from")
    # and greedy, against the whole conversation prefilled from scratch
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    from_session = run(fresh, [("t3", nxt, greedy, 0)])["t3"]
    assert_close_outputs(from_session, alone(model, nxt, greedy), "session vs recomputed", atol=1e-3)


def mixed_workload(seed: int) -> list[tuple[str, list[int], SamplingParams, int]]:
    """Greedy and seeded requests, n = 1 and 2, arriving over 8 steps: odd batch sizes (padded buckets),
    prompts and outputs across chunk boundaries, prefix-cache hits."""
    requests = []
    shared = torch.randint(0, CFG.vocab_size, (3 * C,), generator=torch.Generator().manual_seed(seed)).tolist()
    for i, prompt in enumerate(prompts(12, seed=seed + 1)):
        if i % 4 == 3:
            prompt = shared[:C + i] + prompt[:3]
        params = (SamplingParams(temperature=0.0, max_tokens=6 + 3 * i, logprobs=2) if i % 3 else
                  SamplingParams(n=1 + i % 2, seed=100 + i, max_tokens=6 + 3 * i, **SAMPLED))
        requests.append((f"r{i}", prompt, params, (i * 2) // 3))
    return requests


def compare_runs(got: dict[str, RequestOutput], ref: dict[str, RequestOutput], what: str) -> None:
    assert got.keys() == ref.keys()
    for request_id, out in got.items():
        for choice, expected in zip(out.outputs, ref[request_id].outputs, strict=True):
            if expected.logprobs is None:  # seeded sampling: the draws do not depend on the batch
                assert choice.token_ids == expected.token_ids, (what, request_id)
            else:
                assert_same_tokens(choice, expected, f"{what} {request_id}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graph_decode_equals_eager_through_the_engine():
    model = random_model(CFG, seed=12, dtype=torch.float32, device="cuda")
    requests = mixed_workload(seed=8)
    graphed_engine = make_engine(model, cache_bytes=1 << 22, max_num_seqs=12)
    graphs = graphed_engine.runner.graphs
    replays: list[tuple[int, int | None]] = []  # (rows, bucket) of every decode step
    step = graphs.step
    graphs.step = lambda tokens, slots: replays.append((len(tokens), graphs.bucket_for(len(tokens)))) or step(
        tokens, slots)
    graphed = run(graphed_engine, requests)
    assert replays and all(bucket is not None for _, bucket in replays)  # every decode step came from a graph
    assert any(bucket > rows for rows, bucket in replays) and any(bucket == rows for rows, bucket in replays)
    eager_engine = make_engine(model, cache_bytes=1 << 22, max_num_seqs=12, graphs=False)
    assert eager_engine.runner.graphs is None
    compare_runs(graphed, run(eager_engine, requests), "graphs vs eager")
    alone_runs = {rid: alone(model, p, q, graphs=False) for rid, p, q, _ in requests}
    compare_runs(graphed, alone_runs, "graphs vs each alone")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a model off the current device)")
def test_cuda_graphs_capture_a_model_on_another_device_than_the_current_one():
    device = f"cuda:{torch.cuda.device_count() - 1}"
    assert torch.cuda.current_device() != torch.device(device).index
    model = random_model(CFG, seed=13, dtype=torch.float32, device=device)
    requests = mixed_workload(seed=9)
    graphed = run(make_engine(model, max_num_seqs=12), requests)
    compare_runs(graphed, run(make_engine(model, max_num_seqs=12, graphs=False), requests), "graphs vs eager")
