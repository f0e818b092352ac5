"""What a server started with no flags gives long contexts: no length cap, the state cache on, and
prefixes shared inside a chunk found again (junctions), for text, token ids and chat."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from megalodon_infer import LLM, SamplingParams
from tests.harness import ServerProcess, running_server

OLD_CAP = 32768
CHUNK = 64  # the demo model's chunk size


@pytest.fixture(scope="module")
def default_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`megalodon-serve` with no flags but where to listen (and one torch thread, as every test server)."""
    with running_server(model_dir, tmp_path_factory.mktemp("default_server") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def plain(default_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=default_server.base_url, timeout=600) as client:
        yield client


def complete(client: httpx.Client, prompt, max_tokens: int = 6) -> dict:
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                     "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def cached_tokens(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.slow
def test_a_prompt_longer_than_the_old_cap_is_served(plain: httpx.Client, vocab_size: int) -> None:
    prompt = torch.randint(3, vocab_size, (OLD_CAP + 500,), generator=torch.Generator().manual_seed(0)).tolist()
    body = complete(plain, prompt, max_tokens=3)
    assert body["usage"]["prompt_tokens"] == len(prompt) and body["usage"]["completion_tokens"] == 3
    models = plain.get("/v1/models").json()["data"][0]
    assert models["max_model_len"] == 2**63 - 1  # no cap: the 64-bit position limit is reported
    props = plain.get("/props").json()
    assert props["max_model_len"] is None and props["prefix_cache"]["enabled"]


def shared_prefix_prompts(vocab_size: int, shared: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = [1, *torch.randint(3, vocab_size, (shared - 1,), generator=g).tolist()]
    return [prefix + [first, *torch.randint(3, vocab_size, (9,), generator=g).tolist()]
            for first in (3001, 3002, 3003)]


@pytest.mark.parametrize("shared", [40, 100])  # shorter than a chunk; ending inside the second one
def test_junction_hits_for_token_id_prompts(plain: httpx.Client, vocab_size: int, model_dir: Path,
                                            shared: int) -> None:
    prompts = shared_prefix_prompts(vocab_size, shared, seed=shared)
    bodies = [complete(plain, prompt) for prompt in prompts]
    cached = [cached_tokens(body) for body in bodies]
    assert cached[0] == 0 and cached[1] == (shared // CHUNK) * CHUNK
    assert cached[2] >= shared  # the second request kept its state where it left the first one's path
    expected = LLM(model_dir, prefix_cache_bytes=0).generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert [b["choices"][0]["text"] for b in bodies] == [r.outputs[0].text for r in expected]


def test_junction_hits_for_text_prompts(plain: httpx.Client) -> None:
    system = "You are a careful Python assistant. Answer with code only, no prose.\n" * 2
    questions = ["Sort a list of tuples by the second item.", "Reverse a string.", "Read a JSON file."]
    bodies = [complete(plain, system + question) for question in questions]
    shared = len(plain.post("/tokenize", json={"prompt": system}).json()["tokens"]) - 1  # its last piece may merge
    assert cached_tokens(bodies[0]) == 0 and cached_tokens(bodies[2]) >= shared


def test_every_turn_of_a_chat_after_the_first_reports_cached_tokens(plain: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You write short Python functions."}]
    cached = []
    for question in ("Sort a list.", "Now in reverse.", "Add type hints.", "And a docstring."):
        messages.append({"role": "user", "content": question})
        response = plain.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12,
                                                             "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        cached.append(cached_tokens(body))
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    # each turn resumes at least from the end of the previous turn's prompt
    assert cached == sorted(cached)


def test_a_million_token_prompt_fits_the_default_body_limit(plain: httpx.Client) -> None:
    """As token ids and as text; the wrong model name answers after the body is read and parsed."""
    ids = [4095] * 1_000_000  # the widest ids of the vocabulary
    text = "value = compute(value)\n" * 200_000  # well over 1M tokens of text
    for prompt in (ids, text):
        response = plain.post("/v1/completions", json={"model": "nope", "prompt": prompt, "max_tokens": 1})
        assert response.status_code == 404, response.text[:200]
    too_big = plain.post("/v1/completions", content=b"x" * (33 * 1024 * 1024),
                         headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413
