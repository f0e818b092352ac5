"""Tokenizers for the tokenizer tests: a small BPE trained here, and the real 32k LLaMA/Mistral one.

The small model is trained once per session on CPython's own standard library (a few hundred KB),
so nothing is downloaded; characters it never saw (emoji, CJK) fall back to byte pieces. The 32k
model ships inside the `mistral-common` wheel.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from megalodon_infer.tokenization.tokenizer import Tokenizer

# The user-defined pieces the session tokenizer (tests/conftest.py) is trained with.
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]

_MISTRAL_SPEC = importlib.util.find_spec("mistral_common")
MISTRAL_MODEL = (
    Path(_MISTRAL_SPEC.origin).parent / "data" / "tokenizer.model.v1"
    if _MISTRAL_SPEC is not None and _MISTRAL_SPEC.origin
    else None
)
NO_MISTRAL_REASON = "mistral-common is not installed: it ships the real 32k LLaMA-style tokenizer.model"

# Code point ranges random text is drawn from: ASCII, accented Latin, combining marks, Greek and
# Cyrillic, CJK, Hangul, emoji, and the rest of the BMP and astral planes (surrogates excluded).
UNICODE_RANGES = [
    (0x20, 0x7E),
    (0xC0, 0x17F),
    (0x300, 0x36F),
    (0x370, 0x4FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0xE000, 0xFFFC),  # U+FFFD itself stays out: tests look for it as the mark of a broken byte
    (0x10000, 0x10FFFF),
]
WHITESPACE = [" ", "  ", "\n", "\t", "\n\n    "]


def random_text(rng: random.Random, max_chars: int = 40) -> str:
    """Mixed-script text with runs of spaces, newlines, emoji ZWJ sequences and combining marks."""
    parts = []
    for _ in range(rng.randint(0, max_chars)):
        roll = rng.random()
        if roll < 0.15:
            parts.append(rng.choice(WHITESPACE))
        elif roll < 0.2:
            parts.append("\U0001f468\u200d\U0001f469\u200d\U0001f467")
        else:
            low, high = rng.choice(UNICODE_RANGES)
            parts.append(chr(rng.randint(low, high)))
    return "".join(parts)


@pytest.fixture(
    scope="session",
    params=[
        "trained-bpe-800",
        pytest.param("mistral-32k", marks=pytest.mark.skipif(MISTRAL_MODEL is None, reason=NO_MISTRAL_REASON)),
    ],
)
def model_file(request: pytest.FixtureRequest, trained_model_file: Path) -> Path:
    """Each tokenizer model the tests run against."""
    if request.param == "mistral-32k":
        assert MISTRAL_MODEL is not None
        return MISTRAL_MODEL
    return trained_model_file


@pytest.fixture(scope="session")
def tokenizer(model_file: Path) -> Tokenizer:
    return Tokenizer(model_file)


@pytest.fixture(scope="session")
def sentencepiece(model_file: Path) -> spm.SentencePieceProcessor:
    """The raw sentencepiece processor of the same model: the reference our decode must match."""
    return spm.SentencePieceProcessor(model_file=str(model_file))


def byte_id(tokenizer: Tokenizer, value: int) -> int:
    return tokenizer.piece_to_id(f"<0x{value:02X}>")
