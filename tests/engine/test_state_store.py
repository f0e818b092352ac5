"""The shared state store: a conversation moves to another engine and resumes from its stored state
with identical output; lookups are exact, per namespace and by longest prefix; the folder keeps its budget."""

from __future__ import annotations

import os
import time

import pytest
import torch

from megalodon_infer import SamplingParams
from megalodon_infer.config import EngineConfig
from megalodon_infer.core.sessions import Session, model_fingerprint, save_session
from megalodon_infer.core.state_pool import SlotSnapshot
from megalodon_infer.core.state_store import DirectoryStateStore, _anchor_hashes
from megalodon_infer.engine.llm_engine import LLMEngine
from tests.engine.conftest import greedy_alone
from tests.engine.test_engine import run_to_completion, tokens_of

C = 8  # chunk size of the tiny model


def replica(model, store_dir, **kw) -> LLMEngine:
    """One of several engines over the same model, sharing `store_dir`."""
    return LLMEngine(model, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, prefix_cache_bytes=1 << 24,
                                               state_store_dir=store_dir, **kw))


def run_one(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int, salt: str | None = None):
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens), cache_salt=salt)
    return run_to_completion(engine)[request_id]


def test_a_conversation_moved_to_another_engine_resumes_from_the_store(tiny_model, tmp_path):
    first, second = replica(tiny_model, tmp_path), replica(tiny_model, tmp_path)
    turn1 = list(range(3, 24))  # 21 tokens: the final state lies inside the third chunk
    reply = tokens_of(run_one(first, "t1", turn1, 9))
    assert first.state_store.flush(10)
    turn2 = turn1 + reply + [50, 51, 52]
    calls = []
    original = second.runner.prefill
    second.runner.prefill = lambda slot, toks, all_logits: calls.append(len(toks)) or original(slot, toks, all_logits)
    out = run_one(second, "t2", turn2, 7)
    assert out[-1].num_cached_tokens == len(turn1) + len(reply) - 1  # what the first engine had consumed
    assert sum(calls) == 4  # the last reply token and the new message only
    assert tokens_of(out) == greedy_alone(tiny_model, turn2, 7)
    assert second.state_store.stats.fetched == 1
    # the second engine's own turn is in the store too: a third engine continues from it
    assert second.state_store.flush(10)
    third = replica(tiny_model, tmp_path)
    turn3 = turn2 + tokens_of(out) + [60]
    out3 = run_one(third, "t3", turn3, 5)
    assert out3[-1].num_cached_tokens == len(turn2) + 7 - 1
    assert tokens_of(out3) == greedy_alone(tiny_model, turn3, 5)


def test_the_store_is_consulted_only_for_what_the_cache_lacks(tiny_model, tmp_path):
    engine = replica(tiny_model, tmp_path)
    turn1 = list(range(1, 12))
    reply = tokens_of(run_one(engine, "a", turn1, 6))
    engine.state_store.flush(10)
    run_one(engine, "b", turn1 + reply + [7], 3)  # its own cache holds the conversation: no read
    assert engine.state_store.stats.fetched == 0


def test_states_are_kept_per_namespace(tiny_model, tmp_path):
    first, second = replica(tiny_model, tmp_path), replica(tiny_model, tmp_path)
    turn1 = list(range(5, 30))
    reply = tokens_of(run_one(first, "a", turn1, 5, salt="tenant-a/"))
    first.state_store.flush(10)
    out = run_one(second, "b", turn1 + reply + [9], 4, salt="tenant-b/")
    assert out[-1].num_cached_tokens == 0 and second.state_store.stats.fetched == 0
    out = run_one(second, "c", turn1 + reply + [9], 4, salt="tenant-a/")
    assert out[-1].num_cached_tokens == len(turn1) + len(reply) - 1


def snapshot_at(position: int, fill: float = 1.0) -> SlotSnapshot:
    return SlotSnapshot(position=position, norm_mean=torch.full((2, 4), fill), norm_var=torch.ones(2, 4),
                        cema_h=torch.zeros(2, 4, dtype=torch.complex64), keys=torch.zeros(2, 0, 3),
                        values=torch.zeros(2, 0, 3))


def store_at(tmp_path, max_bytes: int = 1 << 30) -> DirectoryStateStore:
    return DirectoryStateStore(tmp_path, "f" * 32, chunk_size=C, max_bytes=max_bytes)


def test_fetch_finds_the_longest_stored_prefix_and_compares_tokens_exactly(tmp_path):
    store = store_at(tmp_path)
    prompt = list(range(100, 140))
    for n in (5, 8, 13, 30):
        store.put("", prompt[:n], snapshot_at(n), torch.zeros(4))
    store.put("", prompt[:20] + [1], snapshot_at(21), None)  # diverges from the prompt at its last token
    assert store.flush(10)
    assert len(store.fetch("", prompt).token_ids) == 30
    assert len(store.fetch("", prompt[:29]).token_ids) == 13
    assert store.fetch("", prompt, longer_than=30) is None
    assert store.fetch("", [7] + prompt) is None
    # a file under the right name whose own tokens differ is not used: the hashes only find candidates
    anchor = _anchor_hashes("", prompt, C)[1]
    folder = store.root / anchor[:2] / anchor
    (name,) = [p.stem for p in folder.iterdir() if p.stem.startswith("5-")]  # the 13-token state
    forged = Session(name, prompt[:12] + [0], snapshot_at(13), None)
    save_session(folder, forged, store.fingerprint)
    assert len(store.fetch("", prompt[:29]).token_ids) == 8


def test_the_folder_keeps_its_budget_dropping_the_least_recently_used(tmp_path):
    store = store_at(tmp_path)
    prompts = [[k] * 9 for k in range(6)]
    for prompt in prompts:
        store.put("", prompt, snapshot_at(9), None)
    assert store.flush(10)
    files = sorted(store.root.glob("*/*/*.safetensors"))
    size = files[0].stat().st_size
    old = time.time() - 100
    for path in files:
        os.utime(path, (old, old))
    assert store.fetch("", prompts[0]) is not None  # used now: kept
    store.max_bytes = 3 * size
    assert store.prune() <= 3 * size
    kept = [store.fetch("", prompt) is not None for prompt in prompts]
    assert kept[0] and sum(kept) == 3


def test_a_model_with_another_fingerprint_reads_nothing(tiny_model, tmp_path):
    engine = replica(tiny_model, tmp_path)
    reply = tokens_of(run_one(engine, "a", list(range(1, 15)), 4))
    engine.state_store.flush(10)
    other = DirectoryStateStore(tmp_path, "0" * 32, chunk_size=C, max_bytes=1 << 30)
    assert other.fetch("", list(range(1, 15)) + reply) is None
    assert engine.state_store.root.name == model_fingerprint(tiny_model)


def test_the_store_needs_the_prefix_cache(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="prefix cache"):
        LLMEngine(tiny_model, None, EngineConfig(prefix_cache_bytes=0, state_store_dir=tmp_path))
