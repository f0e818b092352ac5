"""The official openai client against the real server: completions and chat, streaming or not.

Outputs of a random (or small) model are arbitrary, so the checks compare the server with itself:
the same seed gives the same text, streamed text equals the non-streamed text, a batch of prompts
equals the prompts sent one by one, and echo's prompt logprobs equal the logprobs the model gave
the same tokens while generating them.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from conftest import MODEL_NAME

PROMPT = "def fibonacci(n):\n    "
IGNORE_EOS = {"ignore_eos": True}


def tokenize(http: httpx.Client, **body: object) -> list[int]:
    response = http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def complete(client: openai.OpenAI, **kwargs: object):
    return client.completions.create(model=MODEL_NAME, **kwargs)


def stream_completion_text(client: openai.OpenAI, **kwargs: object) -> tuple[dict[int, str], dict[int, str]]:
    """Concatenated text and the finish reason of each choice index of a streamed completion."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in complete(client, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def test_completion_returns_text_and_exact_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    result = complete(client, prompt=PROMPT, max_tokens=9, temperature=0, extra_body=IGNORE_EOS)
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert result.model == MODEL_NAME
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str)
    assert result.usage.prompt_tokens == len(tokenize(http, prompt=PROMPT))
    assert result.usage.completion_tokens == 9
    assert result.usage.total_tokens == result.usage.prompt_tokens + 9


def test_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    result = complete(client, prompt=PROMPT, temperature=0, extra_body=IGNORE_EOS)
    assert result.usage.completion_tokens == 16


def test_same_seed_same_text_different_seed_differs(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return complete(client, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed,
                        extra_body=IGNORE_EOS).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


@pytest.mark.parametrize("n", [1, 3])
def test_streamed_completion_equals_non_streamed(client: openai.OpenAI, n: int) -> None:
    kwargs = dict(prompt=PROMPT, max_tokens=24, temperature=0.9, seed=77, n=n, extra_body=IGNORE_EOS)
    whole = complete(client, **kwargs)
    texts, reasons = stream_completion_text(client, **kwargs)
    assert texts == {choice.index: choice.text for choice in whole.choices}
    assert reasons == {choice.index: "length" for choice in whole.choices}


def test_n_samples_are_independent_choices(client: openai.OpenAI) -> None:
    result = complete(client, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=5, extra_body=IGNORE_EOS)
    assert [choice.index for choice in result.choices] == [0, 1, 2]
    assert len({choice.text for choice in result.choices}) > 1
    assert result.usage.completion_tokens == 3 * 16


def test_prompt_batch_equals_prompts_sent_alone(client: openai.OpenAI, http: httpx.Client) -> None:
    prompts = ["import os\n", "class Parser:\n"]
    kwargs = dict(max_tokens=10, temperature=0.8, seed=11, n=2, extra_body=IGNORE_EOS)
    batch = complete(client, prompt=prompts, **kwargs)
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]  # prompt_index * n + i
    for p, prompt in enumerate(prompts):
        alone = complete(client, prompt=prompt, **kwargs)
        assert [c.text for c in batch.choices[2 * p:2 * p + 2]] == [c.text for c in alone.choices]
    assert batch.usage.prompt_tokens == sum(len(tokenize(http, prompt=p)) for p in prompts)

    token_batch = complete(client, prompt=[tokenize(http, prompt=p) for p in prompts], **kwargs)
    assert [c.text for c in token_batch.choices] == [c.text for c in batch.choices]


def test_completion_logprobs_are_consistent(client: openai.OpenAI) -> None:
    result = complete(client, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, extra_body=IGNORE_EOS)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert value <= 0.0
        assert top[token] == value
        # Greedy: the chosen token is the most likely one, and the chosen token plus the top 3 are shown.
        assert value == pytest.approx(max(top.values()), abs=1e-5)
        assert 1 <= len(top) <= 4


def test_echo_scores_the_exact_prompt_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    """lm-eval loglikelihood: echo + logprobs returns one entry per input id (the first null) and
    scores exactly the ids sent: prompt + generated ids, scored with echo, give the logprobs the
    model reported while generating those tokens."""
    prompt_ids = tokenize(http, prompt=PROMPT)
    scored = complete(client, prompt=prompt_ids, max_tokens=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert scored.usage.completion_tokens == 0
    assert scored.choices[0].text == http.post("/detokenize", json={"tokens": prompt_ids}).json()["prompt"]
    assert len(logprobs.token_logprobs) == len(prompt_ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for value, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert max(top.values()) >= value  # the argmax is among the top entries

    one_more = complete(client, prompt=prompt_ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(one_more.choices[0].logprobs.token_logprobs) == len(prompt_ids) + 1
    assert one_more.choices[0].logprobs.token_logprobs[:-1] == pytest.approx(logprobs.token_logprobs)

    generated = complete(client, prompt=prompt_ids, max_tokens=6, temperature=0.8, seed=9, logprobs=0,
                         extra_body={**IGNORE_EOS, "return_tokens_as_token_ids": True}).choices[0].logprobs
    generated_ids = [int(token.removeprefix("token_id:")) for token in generated.tokens]
    rescored = complete(client, prompt=prompt_ids + generated_ids, max_tokens=0, echo=True, logprobs=0,
                        extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert rescored.tokens == [f"token_id:{t}" for t in prompt_ids + generated_ids]
    assert rescored.token_logprobs[len(prompt_ids):] == pytest.approx(generated.token_logprobs, abs=1e-4)


def test_streamed_echo_with_logprobs_equals_non_streamed(client: openai.OpenAI, http: httpx.Client) -> None:
    kwargs = dict(prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, temperature=0, extra_body=IGNORE_EOS)
    whole = complete(client, **kwargs).choices[0]
    chunks = [chunk.choices[0] for chunk in complete(client, stream=True, **kwargs)]
    assert chunks[0].text.startswith(PROMPT)  # the echo comes first
    assert "".join(chunk.text for chunk in chunks) == whole.text
    streamed = [value for chunk in chunks for value in chunk.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    assert [o for chunk in chunks for o in chunk.logprobs.text_offset] == whole.logprobs.text_offset
    assert len(streamed) == len(tokenize(http, prompt=PROMPT)) + 4


def test_echo_batch_has_one_choice_per_prompt_in_order(client: openai.OpenAI, http: httpx.Client) -> None:
    prompts = [tokenize(http, prompt="x = 1"), tokenize(http, prompt="for i in range(10):")]
    result = complete(client, prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    assert [choice.index for choice in result.choices] == [0, 1]
    assert [len(c.logprobs.token_logprobs) for c in result.choices] == [len(p) for p in prompts]


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    kwargs = dict(prompt=PROMPT, max_tokens=40, temperature=0, extra_body=IGNORE_EOS)
    text = complete(client, **kwargs).choices[0].text
    start = next(i for i in range(8, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip())
    stop = text[start:start + 3]
    expected = text[: text.index(stop)]

    stopped = complete(client, stop=[stop, "never-appears-here"], **kwargs).choices[0]
    assert stopped.text == expected
    assert stopped.finish_reason == "stop"
    assert stopped.model_extra["stop_reason"] == stop

    kept = complete(client, stop=stop, **{**kwargs, "extra_body": {**IGNORE_EOS, "include_stop_str_in_output": True}})
    assert kept.choices[0].text == expected + stop

    streamed, reasons = stream_completion_text(client, stop=[stop], **kwargs)
    assert streamed == {0: expected}
    assert reasons == {0: "stop"}


def test_stream_usage_only_when_asked(client: openai.OpenAI) -> None:
    kwargs = dict(prompt=PROMPT, max_tokens=5, temperature=0, extra_body=IGNORE_EOS, stream=True)
    plain = list(complete(client, **kwargs))
    assert all(chunk.choices and chunk.usage is None for chunk in plain)

    with_usage = list(complete(client, stream_options={"include_usage": True}, **kwargs))
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage.completion_tokens == 5
    assert all(chunk.choices and chunk.usage is None for chunk in with_usage[:-1])


def test_chat_completion(client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=7, temperature=0,
                                            extra_body=IGNORE_EOS)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == len(tokenize(http, messages=messages))


def test_chat_text_parts_and_max_completion_tokens(client: openai.OpenAI, http: httpx.Client) -> None:
    parts = [{"type": "text", "text": "Write a loop."}, {"type": "text", "text": "Use range."}]
    result = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": parts}],
                                            max_completion_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    assert result.usage.completion_tokens == 5
    joined = [{"role": "user", "content": "Write a loop.\nUse range."}]
    assert result.usage.prompt_tokens == len(tokenize(http, messages=joined))


def test_chat_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2, extra_body=IGNORE_EOS)
    content = result.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy
        assert entry.token == entry.top_logprobs[0].token
        assert isinstance(entry.bytes, list)


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_role_first_usage_last_and_same_text(client: openai.OpenAI, n: int) -> None:
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, n=n,
                  temperature=0.7, seed=3, extra_body=IGNORE_EOS)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    first = chunks[:n]
    assert sorted(c.choices[0].index for c in first) == list(range(n))
    assert all(c.choices[0].delta.role == "assistant" for c in first)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 * n
    texts: dict[int, str] = {}
    for chunk in chunks[n:-1]:
        choice = chunk.choices[0]
        assert choice.delta.role is None
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {choice.index: choice.message.content for choice in whole.choices}


async def test_concurrent_requests_match_requests_alone(async_client: openai.AsyncOpenAI) -> None:
    prompts = [f"def function_{i}(x):\n    return" for i in range(6)]

    async def greedy(prompt: str) -> str:
        result = await async_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                                       temperature=0, extra_body=IGNORE_EOS)
        return result.choices[0].text

    together = await asyncio.gather(*(greedy(p) for p in prompts))
    alone = [await greedy(p) for p in prompts]
    assert together == alone
