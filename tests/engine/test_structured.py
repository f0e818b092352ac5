"""Structured outputs through the engine: exactness when nothing is forbidden, validity when something
is, admission refusals, and a failing grammar ending its request alone."""

from __future__ import annotations

import json

import jsonschema
import pytest

from megalodon_infer import ModelConfig, SamplingParams
from megalodon_infer.engine.llm import LLM
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.model.init import random_model
from megalodon_infer.sample.params import StructuredOutputsParams
from megalodon_infer.tokenization.tokenizer import Tokenizer

EVERYTHING = StructuredOutputsParams(grammar="start: <[*]>*")
SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "kind": {"enum": ["a", "b", "c"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}},
    "required": ["id", "kind", "tags", "inner"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(trained_model_file) -> Tokenizer:
    return Tokenizer(trained_model_file)


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = ModelConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=48,
                      cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=tokenizer.vocab_size + 7)
    return random_model(cfg, seed=9)


def llm(model, tokenizer, **options) -> LLM:
    return LLM(model, tokenizer=tokenizer, max_num_seqs=6, **options)


def summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, [(lp.token_id, lp.logprob) for lp in c.logprobs or []])
             for c in out.outputs] for out in outputs]


@pytest.mark.parametrize("cache_bytes", [0, 1 << 24])
def test_a_grammar_admitting_every_token_gives_the_unconstrained_outputs(model, tokenizer, cache_bytes):
    prompts = ["def main(", "import os\n", "class A:\n    def f(self"]
    base = dict(temperature=0.9, top_p=0.95, seed=11, n=2, logprobs=2, max_tokens=24, stop=["\n\n"])
    engine = llm(model, tokenizer, prefix_cache_bytes=cache_bytes)
    free = engine.generate(prompts, SamplingParams(**base))
    constrained = engine.generate(prompts, SamplingParams(**base, structured_outputs=EVERYTHING))
    again = engine.generate(prompts, SamplingParams(**base, structured_outputs=EVERYTHING))  # prompts cached now
    assert summary(constrained) == summary(free) == summary(again)


def test_json_schema_outputs_parse_validate_and_end_the_turn(model, tokenizer):
    engine = llm(model, tokenizer)
    spec = StructuredOutputsParams(json=SCHEMA)
    outputs = engine.generate(["{", "data = ", "x"], SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=120,
                                                                    structured_outputs=spec))
    for out in outputs:
        for choice in out.outputs:
            jsonschema.validate(json.loads(choice.text), SCHEMA)
            # the complete grammar forced EOS: the turn ends as the chat template ends turns
            assert choice.finish_reason == "stop" and choice.token_ids[-1] == tokenizer.eos_id


def test_a_complete_grammar_stops_when_eos_cannot_end_the_choice(model, tokenizer):
    engine = llm(model, tokenizer)
    spec = StructuredOutputsParams(choice=("yes", "no"))
    for params in (dict(ignore_eos=True), dict(min_tokens=5)):
        (out,) = engine.generate(["ok? "], SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                                                          structured_outputs=spec, **params))
        choice = out.outputs[0]
        assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
        assert tokenizer.eos_id not in choice.token_ids


def test_an_invalid_constraint_is_refused_at_admission(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    for spec in (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "strange"}}}),
                 StructuredOutputsParams(regex="(unclosed"), StructuredOutputsParams(grammar="start: x +")):
        with pytest.raises(ValueError, match="invalid"):
            engine.add_request("r", [1, 5, 6], SamplingParams(structured_outputs=spec))
        assert not engine.has_unfinished_requests()
    without_tokenizer = LLMEngine(model, None)
    with pytest.raises(ValueError, match="tokenizer"):
        without_tokenizer.add_request("r", [1, 5], SamplingParams(structured_outputs=EVERYTHING))


def run(engine: LLMEngine, break_after: int | None = None) -> dict[str, list[int] | str]:
    """Run every request; after `break_after` steps put request "bad"'s grammar into an error state."""
    results: dict[str, list[int] | str] = {}
    steps = 0
    while engine.has_unfinished_requests():
        if steps == break_after:
            grammar = engine.requests["bad"].choices[0].grammar
            grammar.matcher.consume_token(0)  # <unk>: never allowed, so the matcher enters its error state
        for output in engine.step():
            entry = results.setdefault(output.request_id, [])
            for delta in output.outputs:
                entry += delta.token_ids
            if output.error is not None:
                results[output.request_id] = output.error
        steps += 1
    return results


def test_a_failing_grammar_ends_its_request_alone(model, tokenizer):
    """The batched mask fails for one row: the step retries request by request, the broken request
    ends with an error and every other request gets exactly the tokens it gets alone."""
    def add_all(engine: LLMEngine) -> None:
        spec = StructuredOutputsParams(json=SCHEMA)
        engine.add_request("bad", tokenizer.encode("a"), SamplingParams(temperature=1.0, seed=4, max_tokens=60,
                                                                        structured_outputs=spec))
        engine.add_request("json", tokenizer.encode("b"), SamplingParams(temperature=1.0, seed=5, max_tokens=60,
                                                                         structured_outputs=spec))
        engine.add_request("free", tokenizer.encode("c"), SamplingParams(temperature=0.7, seed=6, max_tokens=20))

    alone = LLMEngine(model, tokenizer)
    add_all(alone)
    expected = run(alone)
    broken = LLMEngine(model, tokenizer)
    add_all(broken)
    results = run(broken, break_after=4)
    assert isinstance(results["bad"], str) and "grammar failed" in results["bad"]
    assert results["json"] == expected["json"] and results["free"] == expected["free"]
