"""Shared fixtures: tiny random Megalodons built in-process (nothing downloads)."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from megalodon_infer.worker.resources import default_torch_threads

TRAINING_CHARS = 400_000
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
FIXTURE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "parity_small"

# The in-process engines and models of the tests run under the product's thread policy (the CPUs this
# process may use, minus one): the suite's own server subprocesses are busy neighbours.
torch.set_num_threads(default_torch_threads())


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (FIXTURE_DIR / "config.json").exists():
        raise FileNotFoundError(f"parity fixtures not found at {FIXTURE_DIR}; the suite needs ../shared/fixtures")
    return FIXTURE_DIR


def _stdlib_lines(max_chars: int) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    total = 0
    for path in sorted(lib.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                lines.append(line)
                total += len(line)
        if total >= max_chars:
            break
    return lines


@pytest.fixture(scope="session")
def trained_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 800-piece BPE with LLaMA's settings (byte fallback, identity normalization, <s>=1,
    </s>=2) plus two user-defined chat pieces."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_stdlib_lines(TRAINING_CHARS)),
        model_writer=model,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=CHAT_SPECIAL_TOKENS,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("trained_tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
