"""Prefix cache and sessions: identical outputs with the cache on and off, exact hits, budgets."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import SamplingParams
from megalodon_infer.engine import LLMEngine
from megalodon_infer.engine_config import EngineConfig
from megalodon_infer.prefix_cache import PrefixCache
from megalodon_infer.sessions import SessionError
from megalodon_infer.state_pool import SlotSnapshot

from .conftest import greedy_alone
from .test_engine import run_to_completion, tokens_of

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
    assert len([lp for o in out if o.prompt_logprobs for lp in o.prompt_logprobs.logprobs]) == len(prompt)


def fake_snapshot(nbytes_floats: int, position: int = 8) -> SlotSnapshot:
    return SlotSnapshot(position=position, norm_mean=torch.zeros(nbytes_floats), norm_var=torch.zeros(0),
                        cema_h=torch.zeros(0, dtype=torch.complex64), keys=torch.zeros(1, 0, 1, 1),
                        values=torch.zeros(1, 0, 1, 1))


def test_eviction_keeps_the_budget_and_never_orphans_or_drops_pinned_entries():
    snap_bytes = fake_snapshot(100).nbytes()
    cache = PrefixCache(chunk_size=2, device_bytes=3 * snap_bytes, host_bytes=2 * snap_bytes)
    chain = [1, 2, 3, 4, 5, 6, 7, 8]
    pinned = cache.insert_boundary(chain[:2], fake_snapshot(100, position=2), pin=True)
    for end in (4, 6, 8):
        cache.insert_boundary(chain[:end], fake_snapshot(100, position=end))
    for other in ([9, 9], [8, 8], [7, 7]):
        cache.insert_boundary(other, fake_snapshot(100, position=2))
        assert cache.stored_bytes(on_host=False) <= 3 * snap_bytes
        assert cache.stored_bytes(on_host=True) <= 2 * snap_bytes
    assert pinned in cache._entries and not pinned.on_host
    for entry in cache._entries:  # every stored node is reachable from the root
        assert entry.parent is None or entry.parent in cache._entries
    assert cache.stats.evictions > 0
    cache.unpin(pinned)
    for other in ([6, 6], [5, 5], [4, 4], [3, 3]):
        cache.insert_boundary(other, fake_snapshot(100, position=2))
    assert pinned not in cache._entries or pinned.on_host


def test_lookup_is_exact_not_by_hash():
    cache = PrefixCache(chunk_size=2, device_bytes=1 << 20)
    cache.insert_boundary([1, 2], fake_snapshot(4, position=2))
    cache.insert_final([1, 2, 3], fake_snapshot(4, position=3), torch.zeros(5))
    assert cache.lookup([1, 2, 3, 4]).num_tokens == 3
    assert cache.lookup([1, 2, 3]).num_tokens == 3  # whole prompt: served from stored logits
    assert cache.lookup([1, 2, 3], allow_full=False).num_tokens == 2
    assert cache.lookup([1, 2]) is None  # a boundary stored without logits: at least one token must run
    cache.insert_boundary([1, 2, 7, 7], fake_snapshot(4, position=4), last_logits=torch.zeros(5))
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
