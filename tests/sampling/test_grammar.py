"""Structured outputs in the sampler: the bitmask, the matcher, and exactness when nothing is forbidden.

A toy vocabulary (single characters, a few words, EOS) stands for a tokenizer: the grammar layer
only ever sees token bytes.
"""

from __future__ import annotations

import re

import pytest
import torch

from megalodon_infer.sample.grammar import (
    SPECIAL_TOKEN_MARK,
    GrammarCompiler,
    GrammarVocabulary,
    apply_bitmask,
    fill_bitmask,
)
from megalodon_infer.sample.params import SamplingParams, StructuredOutputsParams
from megalodon_infer.sample.sampler import SequenceSamplingState, sample

EOS = 0
PIECES = ["</s>", *"abcxyz0123456789-{}\":, ", "ab", "xyz", "12", "true", "false", "null"]
VOCAB = len(PIECES) + 5  # padded like an embedding table: the last ids are never allowed


def toy_encode(text: str) -> list[int]:
    """Longest match first: a valid tokenization of any text the toy vocabulary can spell (the grammar
    engine asks for the tokens of bytes a grammar forces)."""
    ids, pos = [], 0
    while pos < len(text):
        piece = max((p for p in PIECES[1:] if text.startswith(p, pos)), key=len)
        ids.append(PIECES.index(piece))
        pos += len(piece)
    return ids


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokens = [SPECIAL_TOKEN_MARK + b"</s>"] + [p.encode() for p in PIECES[1:]] + [b""] * (VOCAB - len(PIECES))
    return GrammarCompiler(GrammarVocabulary(tokens, EOS, None, [EOS], toy_encode), cache_size=4)


def state(compiler: GrammarCompiler | None, spec: StructuredOutputsParams | None, **params: object
          ) -> SequenceSamplingState:
    grammar = compiler.compile(spec).matcher() if compiler is not None and spec is not None else None
    return SequenceSamplingState(SamplingParams(max_tokens=None, **params), [1], VOCAB, EOS, grammar=grammar)


def run(states: list[SequenceSamplingState], steps: int, seed: int = 0) -> list[list[int]]:
    """Decode `steps` tokens for every row from a fixed pseudo-model (logits depend on the last token);
    a row stops at EOS or when its grammar is complete."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
    live = list(range(len(states)))
    for _ in range(steps):
        live = [i for i in live if not (states[i].output_ids[-1:] == [EOS] or
                                         (states[i].grammar is not None and states[i].grammar.is_finished))]
        if not live:
            break
        last = torch.tensor([(states[i].output_ids or states[i].prompt_ids)[-1] for i in live])
        out = sample(table[last], [states[i] for i in live])
        for i, token in zip(live, out.token_ids, strict=True):
            states[i].append_token(token)
    return [s.output_ids for s in states]


def text_of(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids if i != EOS)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bitmask_forbids_exactly_the_cleared_bits(device: str) -> None:
    """The CPU-built bitmask is unpacked on the logits' own device."""
    logits = torch.randn(3, 70, generator=torch.Generator().manual_seed(1)).to(device)
    allowed = torch.rand(2, 70, generator=torch.Generator().manual_seed(2)) < 0.3
    packed = torch.zeros(2, 3, dtype=torch.int64)
    for row in range(2):
        for token in allowed[row].nonzero().flatten().tolist():
            packed[row, token // 32] |= 1 << (token % 32)
    bitmask = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the words as int32
    masked = logits.clone()
    apply_bitmask(masked, [0, 2], bitmask)
    assert torch.equal(masked[1], logits[1])
    for row, target in ((0, 0), (1, 2)):
        expected = logits[target].masked_fill(~allowed[row].to(device), float("-inf"))
        assert masked.device == logits.device and torch.equal(masked[target], expected)


def test_grammar_admitting_every_token_changes_nothing(compiler: GrammarCompiler) -> None:
    """Same seeds, same draws: a mask that forbids nothing leaves every token as it was, greedy or not."""
    everything = StructuredOutputsParams(grammar="start: <[*]>*")
    settings = [dict(temperature=0.8, seed=7, top_k=20), dict(temperature=0.0), dict(temperature=1.3, seed=3,
                                                                                     top_p=0.9, logprobs=2)]
    free = run([state(None, None, **p) for p in settings], steps=25)
    constrained = run([state(compiler, everything, **p) for p in settings], steps=25)
    assert constrained == free


def test_regex_and_choice_hold_for_every_seed(compiler: GrammarCompiler) -> None:
    pattern = "[a-c]{2}-[0-9]{1,3}"
    for seed in range(12):
        rows = [state(compiler, StructuredOutputsParams(regex=pattern), temperature=1.5, seed=seed),
                state(compiler, StructuredOutputsParams(choice=("xyz", "ab", "12")), temperature=1.5, seed=seed)]
        regex_ids, choice_ids = run(rows, steps=12, seed=seed)
        assert re.fullmatch(pattern, text_of(regex_ids)), text_of(regex_ids)
        assert text_of(choice_ids) in ("xyz", "ab", "12")


def test_json_schema_output_is_valid_and_ends(compiler: GrammarCompiler) -> None:
    import json

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "b": {"enum": ["x", "y"]}, "c": {"type": "boolean"}},
              "required": ["a", "b", "c"], "additionalProperties": False}
    spec = StructuredOutputsParams(json=schema)
    for seed in range(8):
        (ids,) = run([state(compiler, spec, temperature=1.0, seed=seed)], steps=40, seed=seed)
        value = json.loads(text_of(ids))
        assert set(value) == {"a", "b", "c"} and 0 <= value["a"] <= 99 and value["b"] in ("x", "y")


def test_compiled_grammars_are_cached_and_bad_ones_refused(compiler: GrammarCompiler) -> None:
    spec = StructuredOutputsParams(regex="a+")
    assert compiler.compile(spec) is compiler.compile(StructuredOutputsParams(regex="a+"))
    for bad, message in ((StructuredOutputsParams(regex="a(b"), "regex"),
                         (StructuredOutputsParams(json={"type": "nope"}), "Invalid type"),
                         (StructuredOutputsParams(grammar="start: ("), "grammar"),
                         (StructuredOutputsParams(json={"type": "array", "uniqueItems": True}), "uniqueItems")):
        with pytest.raises(ValueError, match=message):
            compiler.compile(bad)
    # non-strict (lenient) ignores what the engine does not implement
    compiler.compile(StructuredOutputsParams(json={"type": "array", "uniqueItems": True}, lenient=True))


def test_params_take_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=("a",))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="non-empty"):
        StructuredOutputsParams(choice=())
    with pytest.raises(ValueError, match="valid JSON"):
        StructuredOutputsParams(json="{not json")
    # equal schemas (dict or text, same key order) are one cache key
    assert StructuredOutputsParams(json={"type": "object"}) == StructuredOutputsParams(json='{"type": "object"}')


def test_a_rejected_token_raises_and_a_dead_grammar_refuses_to_mask(compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(StructuredOutputsParams(choice=("ab",))).matcher()
    with pytest.raises(ValueError, match="rejected"):
        matcher.accept(PIECES.index("z"))
    with pytest.raises(ValueError, match="grammar failed"):
        fill_bitmask([matcher])
