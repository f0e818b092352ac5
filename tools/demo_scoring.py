"""The bundled demo model: where it lives, and the measurements that say it works.

The demo model (`demo_model/`: a small code-completion Megalodon with its own SentencePiece
tokenizer, trained by `scripts/train_demo.py`) is what `megalodon-serve` runs with no arguments.
The scoring functions here drive the model only through its public stateful `forward`, so they
measure the decode path a server uses; `scripts/eval_demo.py` and the tests share them. Nothing
here knows about requests or tokenizers.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon_infer.config import DEMO_MODEL_DIR
from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.state import MegalodonState

REPO = Path(__file__).resolve().parents[1]
EVAL_TEXT = REPO / "tests" / "data" / "demo_heldout.jsonl"

# Called at every chunk boundary with (model, state); may alter the state (deliberately broken
# decodes in the tests) or return it unchanged.
StateHook = Callable[[Megalodon, MegalodonState], None]

def demo_model_dir() -> Path:
    """Directory of the bundled demo model (config.json, model.safetensors, tokenizer.model)."""
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {DEMO_MODEL_DIR}; "
                                "run scripts/train_demo.py to create it")
    return DEMO_MODEL_DIR


def committed_demo_file(rev: str, name: str) -> bytes:
    """The bytes of demo_model/`name` as committed at git revision `rev` (an earlier demo model)."""
    return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:megalodon_infer/demo_model/{name}"],
                          check=True, capture_output=True).stdout


def _target_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [B, L, V], targets [B, L] -> negative log-likelihoods [B, L] (nats, fp32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view(targets.shape)


@torch.no_grad()
def sequence_nll(model: Megalodon, tokens: Tensor, at_chunk_boundary: StateHook | None = None) -> Tensor:
    """NLL [B, T - 1] of tokens[:, 1:], each token given every token before it, from a fresh state.

    tokens: [B, T] int64, rows of equal length (one document each). The tokens go through
    `model.forward` one chunk at a time, so the state (norm statistics, CEMA, position) is carried
    across every chunk boundary exactly as in serving, and memory stays flat for long documents.
    `at_chunk_boundary` runs before every chunk after the first.
    """
    tokens = tokens.to(model.device)
    B, T = tokens.shape
    C = model.config.chunk_size
    state = model.allocate_state(B)
    nll = []
    for start in range(0, T - 1, C):
        if start and at_chunk_boundary is not None:
            at_chunk_boundary(model, state)
        end = min(start + C, T - 1)
        logits, state = model.forward(tokens[:, start:end], state)
        nll.append(_target_nll(logits, tokens[:, start + 1:end + 1]))
    return torch.cat(nll, dim=1)


@torch.no_grad()
def context_nll(model: Megalodon, docs: Sequence[Sequence[int]], target_chunk: int, num_context_chunks: int) -> Tensor:
    """NLL [num_docs, C] of the tokens of chunk `target_chunk` given only `num_context_chunks` before it.

    Each document's target chunk predicts ids[tC + 1 : (t+1)C + 1] from inputs ids[tC : (t+1)C];
    the model starts from a fresh state k chunks earlier (k = num_context_chunks), so the same
    targets are scored with more or less preceding context. Documents need >= (t+1)C + 1 tokens.
    """
    C = model.config.chunk_size
    t, k = target_chunk, num_context_chunks
    if not 0 <= k <= t:
        raise ValueError(f"num_context_chunks must be in [0, {t}], got {k}")
    short = [len(d) for d in docs if len(d) < (t + 1) * C + 1]
    if short:
        raise ValueError(f"every document needs >= {(t + 1) * C + 1} tokens; one has {short[0]}")
    batch = torch.tensor([list(d[(t - k) * C:(t + 1) * C + 1]) for d in docs], device=model.device)
    logits, _ = model.forward(batch[:, :-1], model.allocate_state(len(docs)))
    return _target_nll(logits[:, -C:], batch[:, -C:])


def load_eval_texts(path: Path = EVAL_TEXT) -> list[str]:
    """The evaluation files' text (pip, setuptools, wheel: never trained on), in a fixed order."""
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def own_unigram_nll(targets: Sequence[int]) -> Tensor:
    """NLL [T] of `targets` under the unigram model fitted to those very targets (their token
    frequencies). Its perplexity is exp(entropy of the text's token distribution): the best any
    context-free predictor can do on this text, so a model must use context to go below it."""
    ids = torch.as_tensor(list(targets), dtype=torch.int64)
    counts = torch.bincount(ids).double()
    return -(counts[ids].log() - counts.sum().log())
