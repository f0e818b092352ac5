"""Prefix cache and sessions: identical outputs with the cache on and off, exact hits, budgets."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import SamplingParams
from megalodon_infer.config import EngineConfig
from megalodon_infer.core.prefix_cache import PrefixCache
from megalodon_infer.core.sessions import SessionError
from megalodon_infer.core.state_pool import SlotSnapshot
from megalodon_infer.engine.llm_engine import LLMEngine
from tests.engine.conftest import greedy_alone
from tests.engine.test_engine import run_to_completion, tokens_of

C = 8  # chunk size of the tiny model


def make_engine(model, cache_bytes=1 << 24, **kw) -> LLMEngine:
    return LLMEngine(model, None, EngineConfig(max_num_seqs=kw.pop("max_num_seqs", 6), prefix_cache_bytes=cache_bytes,
                                               max_num_batched_tokens=kw.pop("budget", 64), **kw))


def shared_prefix_prompts(seed: int) -> list[list[int]]:
    """Prompts sharing prefixes of 5 (inside a chunk), 8 (a boundary) and 27 (several chunks) tokens."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 97, (40,), generator=g).tolist()
    prompts = []
    for shared in (5, 8, 27, 27, 8, 5, 40):
        tail = torch.randint(0, 97, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        prompts.append(base[:shared] + tail)
    prompts.append(list(base))  # the same prompt twice: a full hit on the second
    prompts.append(list(base))
    return prompts


@pytest.mark.parametrize("concurrent", [False, True])
def test_outputs_identical_with_cache_on_and_off(tiny_model, concurrent):
    prompts = shared_prefix_prompts(seed=1)
    engine = make_engine(tiny_model)
    results: dict[str, list] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=13))
        if not concurrent:  # one at a time: every later request can hit what earlier ones stored
            for rid, outs in run_to_completion(engine).items():
                results.setdefault(rid, []).extend(outs)
    for rid, outs in run_to_completion(engine).items():
        results.setdefault(rid, []).extend(outs)
    for i, prompt in enumerate(prompts):
        assert tokens_of(results[f"r{i}"]) == greedy_alone(tiny_model, prompt, 13), i
    cached = [results[f"r{i}"][-1].num_cached_tokens for i in range(len(prompts))]
    if not concurrent:
        # whole chunks of the shared prefix: 8 from the first 8-token sharer, then 24 of the 27-token one
        assert cached[0] == 0 and cached[2] == 8 and cached[3] == 24
        assert cached[-1] == len(prompts[-1])  # found whole, with its logits: nothing to prefill
    assert engine.prefix_cache.stats.hit_tokens == sum(cached)
    assert engine.pool.num_free == engine.pool.num_slots


def test_next_chat_turn_resumes_from_the_finished_state(tiny_model):
    engine = make_engine(tiny_model)
    turn1 = list(range(1, 20))
    engine.add_request("t1", turn1, SamplingParams(temperature=0, max_tokens=9))
    reply = tokens_of(run_to_completion(engine)["t1"])
    turn2 = turn1 + reply + [40, 41, 42]
    calls = []
    original = engine.runner.prefill
    engine.runner.prefill = lambda slot, toks, all_logits: calls.append(len(toks)) or original(slot, toks, all_logits)
    engine.add_request("t2", turn2, SamplingParams(temperature=0, max_tokens=7))
    out = run_to_completion(engine)["t2"]
    assert out[-1].num_cached_tokens == len(turn1) + len(reply) - 1  # all but the reply's unconsumed last token
    assert sum(calls) == 4  # only the new message (and that last reply token) were prefilled
    assert tokens_of(out) == greedy_alone(tiny_model, turn2, 7)


def test_two_requests_resuming_one_snapshot_do_not_interfere(tiny_model):
    engine = make_engine(tiny_model)
    prefix = list(range(30, 30 + 3 * C))
    engine.add_request("seed", prefix + [1], SamplingParams(temperature=0, max_tokens=2))
    run_to_completion(engine)
    a, b = prefix + [5, 6], prefix + [7]
    engine.add_request("a", a, SamplingParams(temperature=0, max_tokens=11))
    engine.add_request("b", b, SamplingParams(temperature=0, max_tokens=11))
    results = run_to_completion(engine)
    assert results["a"][-1].num_cached_tokens == 3 * C and results["b"][-1].num_cached_tokens == 3 * C
    assert tokens_of(results["a"]) == greedy_alone(tiny_model, a, 11)
    assert tokens_of(results["b"]) == greedy_alone(tiny_model, b, 11)


def test_prompt_logprobs_requests_bypass_the_cache(tiny_model):
    engine = make_engine(tiny_model)
    prompt = list(range(1, 30))
    engine.add_request("warm", prompt, SamplingParams(max_tokens=1))
    run_to_completion(engine)
    engine.add_request("echo", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    out = run_to_completion(engine)["echo"]
    assert out[-1].num_cached_tokens == 0
    assert len([lp for o in out if o.prompt_logprobs for lp in o.prompt_logprobs]) == len(prompt)


def fake_snapshot(nbytes_floats: int, position: int = 8) -> SlotSnapshot:
    return SlotSnapshot(position=position, norm_mean=torch.zeros(nbytes_floats), norm_var=torch.zeros(0),
                        cema_h=torch.zeros(0, dtype=torch.complex64), keys=torch.zeros(1, 0, 1, 1),
                        values=torch.zeros(1, 0, 1, 1))


def test_eviction_keeps_the_budget_and_never_orphans_or_drops_pinned_entries():
    snap_bytes = fake_snapshot(100).nbytes()
    cache = PrefixCache(chunk_size=2, device_bytes=3 * snap_bytes, host_bytes=2 * snap_bytes)
    chain = [1, 2, 3, 4, 5, 6, 7, 8]
    pinned = parent = cache.insert_boundary(None, chain[:2], fake_snapshot(100, position=2), pin=True)
    for end in (4, 6, 8):
        parent = cache.insert_boundary(parent, chain[end - 2:end], fake_snapshot(100, position=end))
    for other in ([9, 9], [8, 8], [7, 7]):
        cache.insert_boundary(None, other, fake_snapshot(100, position=2))
        assert cache.stored_bytes(on_host=False) <= 3 * snap_bytes
        assert cache.stored_bytes(on_host=True) <= 2 * snap_bytes
    assert pinned in cache._entries and not pinned.on_host
    for entry in cache._entries:  # every stored node is reachable from the root
        assert entry.parent is None or entry.parent in cache._entries
    assert cache.stats.evictions > 0
    cache.unpin(pinned)
    for other in ([6, 6], [5, 5], [4, 4], [3, 3]):
        cache.insert_boundary(None, other, fake_snapshot(100, position=2))
    assert pinned not in cache._entries or pinned.on_host


def test_eviction_cost_does_not_grow_with_the_number_of_entries(monkeypatch):
    """Each insert into a full cache evicts by popping a heap: the work per insert stays bounded
    (no scan over the stored entries, no re-summing of their bytes)."""
    snap_bytes = fake_snapshot(10).nbytes()
    cache = PrefixCache(chunk_size=2, device_bytes=50 * snap_bytes, host_bytes=50 * snap_bytes)
    checks = []
    original = PrefixCache._evictable
    monkeypatch.setattr(PrefixCache, "_evictable", lambda self, e: checks.append(1) or original(self, e))
    per_insert = []
    for i in range(2000):
        before = len(checks)
        cache.insert_boundary(None, [i, i], fake_snapshot(10, position=2))
        per_insert.append(len(checks) - before)
        assert cache.stored_bytes(on_host=False) <= 50 * snap_bytes
        assert cache.stored_bytes(on_host=True) <= 50 * snap_bytes
    assert len(cache) == 100 and cache.stats.evictions == 1950
    assert max(per_insert[200:]) <= 8  # the same at 2,000 inserts as at 200
    assert cache.stored_bytes() == sum(e.nbytes for e in cache._entries)


def test_lookup_is_exact_not_by_hash():
    cache = PrefixCache(chunk_size=2, device_bytes=1 << 20)
    root = cache.insert_boundary(None, [1, 2], fake_snapshot(4, position=2))
    cache.insert_final([1, 2, 3], fake_snapshot(4, position=3), torch.zeros(5))
    assert cache.lookup([1, 2, 3, 4]).num_tokens == 3
    assert cache.lookup([1, 2, 3]).num_tokens == 3  # whole prompt: served from stored logits
    assert cache.lookup([1, 2, 3], allow_full=False).num_tokens == 2
    assert cache.lookup([1, 2]) is None  # a boundary stored without logits: at least one token must run
    cache.insert_boundary(root, [7, 7], fake_snapshot(4, position=4), last_logits=torch.zeros(5))
    assert cache.lookup([1, 2, 7, 7]).num_tokens == 4
    assert cache.lookup([2, 1, 3]) is None and cache.lookup([1, 3, 3]) is None


def test_saved_session_survives_a_restart(tiny_model, tmp_path):
    engine = make_engine(tiny_model)
    convo = list(range(3, 3 + 2 * C + 3))
    engine.add_request("t1", convo, SamplingParams(temperature=0, max_tokens=6))
    reply = tokens_of(run_to_completion(engine)["t1"])
    saved = engine.save_session("chat-42", convo + reply, tmp_path)
    assert saved == len(convo) + len(reply) - 1
    # a new engine (a server restart): empty cache, same weights
    fresh = make_engine(tiny_model)
    assert fresh.load_session("chat-42", tmp_path) == saved
    nxt = convo + reply + [50, 51]
    fresh.add_request("t2", nxt, SamplingParams(temperature=0, max_tokens=8))
    out = run_to_completion(fresh)["t2"]
    assert out[-1].num_cached_tokens == saved
    assert tokens_of(out) == greedy_alone(tiny_model, nxt, 8)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".hidden", "x" * 65, "a..b", "spaces here"])
def test_session_names_are_validated(tiny_model, tmp_path, name):
    engine = make_engine(tiny_model)
    with pytest.raises(SessionError, match="session names"):
        engine.load_session(name, tmp_path)


def test_damaged_foreign_or_oversized_sessions_are_refused(tiny_model, tmp_path):
    from megalodon_infer import ModelConfig
    from megalodon_infer.model.init import random_model

    engine = make_engine(tiny_model)
    engine.add_request("t", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    reply = tokens_of(run_to_completion(engine)["t"])
    engine.save_session("good", [1, 2, 3] + reply, tmp_path)
    with pytest.raises(SessionError, match="over the"):
        engine.load_session("good", tmp_path, max_bytes=10)
    other = random_model(ModelConfig(**{**tiny_model.config.model_dump(), "vocab_size": 97}), seed=999,
                         dtype=torch.float64)
    with pytest.raises(SessionError, match="different model"):
        make_engine(other).load_session("good", tmp_path)
    path = tmp_path / "good.safetensors"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(SessionError, match="damaged"):
        engine.load_session("good", tmp_path)
    with pytest.raises(SessionError, match="no saved session"):
        engine.load_session("missing", tmp_path)


@pytest.mark.parametrize("shared", [5, 13, 21])
def test_a_shared_prefix_ending_inside_a_chunk_is_computed_at_most_twice(tiny_model, shared):
    """Junctions: the second request that diverges from a cached path inside a chunk keeps its state
    at the divergence point, so the third finds the whole shared prefix (shorter than a chunk, or
    ending inside one); outputs stay those of the cache off."""
    g = torch.Generator().manual_seed(shared)
    prefix = torch.randint(0, 97, (shared,), generator=g).tolist()
    # suffixes with distinct first tokens: the prompts agree on exactly `shared` tokens
    prompts = [prefix + [first] + torch.randint(0, 97, (6,), generator=g).tolist() for first in (90, 91, 92, 93)]
    engine = make_engine(tiny_model)
    prefilled = []
    original = engine.runner.prefill
    engine.runner.prefill = lambda slot, toks, all_logits: prefilled.append(len(toks)) or original(slot, toks,
                                                                                                   all_logits)
    cached, outputs = [], []
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=5)
    for i, prompt in enumerate(prompts):
        prefilled.clear()
        engine.add_request(f"r{i}", prompt, params)
        out = run_to_completion(engine)[f"r{i}"]
        cached.append(out[-1].num_cached_tokens)
        outputs.append(tokens_of(out))
        if i == 1:
            assert (shared % C) in prefilled or shared % C == 0  # a segment ended exactly at the junction
    assert cached[0] == 0 and cached[1] == (shared // C) * C
    assert cached[2] >= shared and cached[3] >= shared
    off = make_engine(tiny_model, cache_bytes=0)
    for i, prompt in enumerate(prompts):
        off.add_request(f"r{i}", prompt, params)
    assert [tokens_of(v) for _, v in sorted(run_to_completion(off).items())] == outputs


def test_the_same_prompt_again_is_served_from_the_stored_prompt_state(tiny_model):
    """A prompt ending inside a chunk leaves its state and last logits: sent again it runs no prefill."""
    prompt = list(range(30, 41))  # 11 tokens: one chunk and 3
    engine = make_engine(tiny_model)
    engine.add_request("first", prompt, SamplingParams(temperature=0, max_tokens=1))
    run_to_completion(engine)
    calls = []
    original = engine.runner.prefill
    engine.runner.prefill = lambda *a: calls.append(a) or original(*a)
    engine.add_request("again", prompt, SamplingParams(temperature=0, max_tokens=4))
    out = run_to_completion(engine)["again"]
    assert not calls and out[-1].num_cached_tokens == len(prompt)
    assert tokens_of(out) == greedy_alone(tiny_model, prompt, 4)


def test_match_length_compares_tokens_beyond_stored_states():
    cache = PrefixCache(chunk_size=4, device_bytes=1 << 20)
    root = cache.insert_boundary(None, [1, 2, 3, 4], fake_snapshot(4, position=4))
    cache.insert_boundary(root, [5, 6, 7, 8], fake_snapshot(4, position=8))
    cache.insert_final([1, 2, 3, 4, 9, 9, 9], fake_snapshot(4, position=7), None)
    assert cache.match_length([1, 2, 3, 4, 5, 6, 0]) == 6  # inside the stored block [5, 6, 7, 8]
    assert cache.match_length([1, 2, 3, 4, 9, 9, 1]) == 6  # inside the final's tail
    assert cache.match_length([1, 2, 3, 4, 5, 6, 7, 8, 2]) == 8
    assert cache.match_length([1, 2, 7]) == 2 and cache.match_length([3]) == 0
    assert cache.match_length([1, 2]) == 2  # never longer than the prompt
