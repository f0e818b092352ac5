"""Text coming out of the engine: stop strings across token boundaries, UTF-8 over byte tokens."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig, SamplingParams
from megalodon_infer.engine.llm import LLM
from megalodon_infer.engine.request import Request
from megalodon_infer.model.init import random_model
from megalodon_infer.tokenization.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(trained_model_file) -> Tokenizer:
    return Tokenizer(trained_model_file)


@pytest.fixture(scope="module")
def text_llm(tokenizer) -> LLM:
    # vocabulary padded past the tokenizer's: the engine must never sample the padding ids
    cfg = ModelConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=48,
                      cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=tokenizer.vocab_size + 7)
    return LLM(random_model(cfg, seed=5), tokenizer=tokenizer, max_num_seqs=4)


def test_text_equals_decode_of_tokens_and_padding_ids_never_appear(text_llm, tokenizer):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True)
    for result in text_llm.generate(["def main(", "import os\n"], params):
        choice = result.outputs[0]
        assert max(choice.token_ids) < tokenizer.vocab_size
        full = tokenizer.decode(result.prompt_token_ids + choice.token_ids)
        assert choice.text == full[len(tokenizer.decode(result.prompt_token_ids)):]


def test_stop_string_spanning_tokens_is_found_and_cut(text_llm, tokenizer):
    prompt = "class Foo:\n"
    base = text_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    # find a place where one token's text ends and the next begins; straddle it with the stop string
    pieces = [tokenizer.decode(base.token_ids[: i + 1]) for i in range(len(base.token_ids))]
    boundary = next(len(p) for p, q in zip(pieces[5:], pieces[6:], strict=False) if len(q) - len(p) >= 2)
    stop = base.text[boundary - 1: boundary + 1]
    assert len(stop) == 2
    cut = base.text.index(stop)
    for include in (False, True):
        result = text_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                            stop=[stop], include_stop_str_in_output=include))
        choice = result[0].outputs[0]
        assert choice.finish_reason == "stop" and choice.stop_reason == stop
        assert choice.text == base.text[: cut + (len(stop) if include else 0)]


def feed(request: Request, token_ids: list[int]) -> list[str]:
    choice = request.choices[0]
    deltas = []
    for token_id in token_ids:
        request.append_token(choice, token_id, None, now=0.0)
        deltas.append(choice.take_delta(False).text)
    return deltas


def make_request(params: SamplingParams, tokenizer) -> Request:
    return Request("r", [1], params, params.max_tokens, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size,
                   device=torch.device("cpu"), arrival_time=0.0, queued_time=0.0)


def test_multibyte_characters_split_over_byte_tokens_are_never_broken(tokenizer):
    text = " ok \U0001f600 fin \u00e9\u4e2d"
    ids = tokenizer.encode(text, add_bos=False)
    byte_tokens = [i for i in ids if tokenizer.byte_value(i) is not None]
    assert len(byte_tokens) >= 4  # the emoji and CJK character really are spelled in bytes
    request = make_request(SamplingParams(max_tokens=100), tokenizer)
    deltas = feed(request, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode([1, *ids])[len(tokenizer.decode([1])):]
    # the emoji appears whole, in the delta of its last byte token
    assert any("\U0001f600" in d for d in deltas)


def test_stop_string_split_across_deltas_is_held_back(tokenizer):
    ids = tokenizer.encode("x = 1\nreturn value\n", add_bos=False)
    request = make_request(SamplingParams(max_tokens=100, stop=["return"]), tokenizer)
    deltas = feed(request, ids)
    assert "".join(deltas) == "x = 1\n"
    assert request.choices[0].finish_reason == "stop" and request.choices[0].stop_reason == "return"
    assert not any("ret" in d for d in deltas)


def test_eos_ends_the_choice_without_text_and_min_tokens_delays_it(tokenizer):
    request = make_request(SamplingParams(max_tokens=10), tokenizer)
    feed(request, [tokenizer.encode("a", add_bos=False)[-1], tokenizer.eos_id])
    assert request.choices[0].finish_reason == "stop" and request.choices[0].stop_reason is None
    delayed = make_request(SamplingParams(max_tokens=10, min_tokens=3), tokenizer)
    feed(delayed, [tokenizer.eos_id, tokenizer.eos_id])
    assert delayed.choices[0].finish_reason is None


def test_logprobs_follow_the_generated_tokens(text_llm):
    result = text_llm.generate(["x"], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert [lp.token_id for lp in result.logprobs] == result.token_ids
    for lp in result.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy: the chosen one is the best
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0
        assert torch.tensor([p for _, p in lp.top]).diff().le(0).all()
