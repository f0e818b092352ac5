"""The real server on the model's device, end to end: concurrent streams through the official openai
client, each equal to its prompt run alone.

`megalodon-serve --device cuda --kernels fused` (the bundled demo model in float32, decode replayed
from CUDA graphs, the prefix cache at its defaults) with 32 state slots answers 32 streamed greedy
completions of distinct prompts sent at once; then each prompt is sent again as the only request.
Every stream's tokens equal its lone run's, up to a first divergence at a near-tie of the lone run's
top-2 logprobs (float32 logits of a batch are not bitwise those of one row: see
tests/engine/test_cuda_engine.py). The `[cpu]` parameter runs the same check with 4 streams (slow: it
starts a server); `[cuda]` is marked `gpu` and skipped without a CUDA device (scripts/gpu_check.sh
runs it on the GPU machine).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import openai
import pytest
import torch

from megalodon_infer.config import DEMO_MODEL_DIR
from tests.harness import ServerProcess

MODEL = "demo"
NEAR_TIE = 1e-3
NO_CUDA = "needs a CUDA device; scripts/gpu_check.sh runs it on the GPU machine"
# (device, concurrent streams, tokens per stream): 48 tokens cross the demo model's 64-token chunks
SETUPS = [
    pytest.param(("cpu", 4, 12), marks=pytest.mark.slow, id="cpu"),
    pytest.param(("cuda", 32, 48), marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason=NO_CUDA)], id="cuda"),
]
EXTRA = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@dataclass
class Served:
    server: ServerProcess
    device: str
    streams: int
    max_tokens: int


@pytest.fixture(scope="module", params=SETUPS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    device, streams, max_tokens = request.param
    args = ["--device", device, "--kernels", "fused", "--max-num-seqs", str(streams), "--served-model-name", MODEL]
    server = ServerProcess(DEMO_MODEL_DIR, tmp_path_factory.mktemp(f"server-{device}") / "server.log", args)
    try:
        server.wait_healthy()
        yield Served(server, device, streams, max_tokens)
    finally:
        server.terminate()


def prompts(count: int) -> list[str]:
    """Distinct prompts of 10 to ~90 tokens (some past the first 64-token chunk)."""
    body = "value = normalise(value, depth=depth + 1)\n    "
    return [f"def handler_{i}(request, retries={i}):\n    " + body * (i % 7) + f"# step {i}\n    "
            for i in range(count)]


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    first_token_at: float = 0.0
    finished_at: float = 0.0

    def add(self, logprobs, text: str) -> None:
        self.text += text
        for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True):
            self.token_ids.append(_token_id(token))
            self.top.append({_token_id(t): value for t, value in top.items()})


def _token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.removeprefix("token_id:"))


async def stream_all(base_url: str, prompt_list: list[str], max_tokens: int) -> list[Completion]:
    """Every prompt streamed at once; tokens, top-2 logprobs, text and timing of each."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as client:

        async def one(prompt: str) -> Completion:
            out = Completion()
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                     logprobs=2, stream=True, extra_body=EXTRA)
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.logprobs is not None and choice.logprobs.tokens:
                        out.first_token_at = out.first_token_at or time.monotonic()
                        out.add(choice.logprobs, choice.text)
            out.finished_at = time.monotonic()
            return out

        return await asyncio.gather(*(one(p) for p in prompt_list))


def alone(client: openai.OpenAI, prompt: str, max_tokens: int) -> Completion:
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2,
                                       extra_body=EXTRA)
    out = Completion()
    out.add(result.choices[0].logprobs, result.choices[0].text)
    return out


def most_in_flight(completions: list[Completion]) -> int:
    """The most streams that had begun and not yet ended at one moment."""
    return max(sum(c.first_token_at <= o.first_token_at <= c.finished_at for c in completions) for o in completions)


def test_concurrent_greedy_streams_equal_each_prompt_alone(served: Served):
    server = served.server
    props = httpx.get(server.base_url + "/props", timeout=30).json()
    assert props["decode_kernels"] == "fused" and props["device"].startswith(served.device), props
    if served.device == "cuda":
        assert "captured decode CUDA graphs" in server.log_text(), server.log_tail()
    prompt_list = prompts(served.streams)
    concurrent = asyncio.run(stream_all(server.base_url + "/v1", prompt_list, served.max_tokens))
    assert most_in_flight(concurrent) >= max(2, served.streams // 2), "the streams did not run together"
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    for i, (prompt, got) in enumerate(zip(prompt_list, concurrent, strict=True)):
        ref = alone(client, prompt, served.max_tokens)
        assert len(got.token_ids) == len(ref.token_ids) == served.max_tokens, (i, server.log_tail())
        if got.token_ids == ref.token_ids:
            assert got.text == ref.text, i
            continue
        k = next(k for k, (a, b) in enumerate(zip(got.token_ids, ref.token_ids, strict=True)) if a != b)
        gap = ref.top[k][ref.token_ids[k]] - ref.top[k].get(got.token_ids[k], float("-inf"))
        assert gap <= NEAR_TIE, f"stream {i} token {k}: {got.token_ids[k]}, alone {ref.token_ids[k]} (gap {gap:.2e})"
