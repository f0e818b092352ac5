"""Measure the bundled demo model on held-out stdlib files; print the README's markdown tables.

    python scripts/eval_demo.py                      # the numbers in the README (~2 min on 2 cores)
    python scripts/eval_demo.py --max-doc-tokens 1024 --model path/to/model

Reports held-out token-level perplexity of the model (each file from a fresh state, run through
the stateful forward one chunk at a time), the same with the state reset at every chunk boundary
(what a decode path that loses its state would score), the unigram baseline (training-token
counts, add-one smoothing), and the perplexity of one fixed target chunk given k chunks of
preceding context. The held-out text and the unigram counts are written by `train_demo.py` under
tests/data/, so the evaluation does not depend on the interpreter's own standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalodon_infer import load_model  # noqa: E402
from megalodon_infer.model.megalodon import Megalodon  # noqa: E402
from megalodon_infer.model.state import MegalodonState  # noqa: E402
from megalodon_infer.tokenization.tokenizer import Tokenizer  # noqa: E402
from tools.demo_scoring import context_nll, demo_model_dir, sequence_nll, unigram_nll  # noqa: E402

DATA = REPO / "tests" / "data"
CONTEXT_CHUNKS = (0, 1, 2, 4, 8)


def load_heldout(tokenizer: Tokenizer, path: Path = DATA / "demo_heldout.jsonl") -> list[list[int]]:
    """Held-out documents as `<s> text </s>` ids, exactly as the training documents were encoded."""
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        docs.append(tokenizer.encode(text, add_bos=True, add_eos=True, parse_special_tokens=False))
    return docs


def load_unigram_counts(path: Path = DATA / "demo_unigram_counts.json") -> list[int]:
    return json.loads(path.read_text())["counts"]


def reset_state(model: Megalodon, state: MegalodonState) -> None:
    """A broken decode: forget everything (norm statistics, CEMA, position) at a chunk boundary."""
    model.reset_rows(state, torch.arange(state.batch_size))


def evaluate(model: Megalodon, docs: list[list[int]], counts: list[int], target_chunk: int) -> dict:
    carried, reset, unigram = [], [], []
    for ids in docs:
        tokens = torch.tensor([ids])
        carried.append(sequence_nll(model, tokens)[0])
        reset.append(sequence_nll(model, tokens, at_chunk_boundary=reset_state)[0])
        unigram.append(unigram_nll(counts, ids[1:]))
    C = model.config.chunk_size
    long_docs = [d for d in docs if len(d) >= (target_chunk + 1) * C + 1]
    context = {k: context_nll(model, long_docs, target_chunk, k).mean().item() for k in CONTEXT_CHUNKS
               if k <= target_chunk}
    return {
        "num_docs": len(docs),
        "num_tokens": sum(len(d) - 1 for d in docs),
        "ppl": math.exp(torch.cat(carried).mean().item()),
        "ppl_state_reset": math.exp(torch.cat(reset).mean().item()),
        "ppl_unigram": math.exp(torch.cat(unigram).mean().item()),
        "num_context_docs": len(long_docs),
        "context_ppl": {k: math.exp(v) for k, v in context.items()},
    }


def format_tables(r: dict, chunk_size: int, target_chunk: int) -> str:
    lines = [
        f"Held-out stdlib files: {r['num_docs']} files, {r['num_tokens']:,} tokens.",
        "",
        "| model | held-out perplexity |",
        "|---|---|",
        f"| demo Megalodon (state carried across chunks) | {r['ppl']:.2f} |",
        f"| same model, state reset at every chunk boundary | {r['ppl_state_reset']:.2f} |",
        f"| unigram baseline (training counts, add-one) | {r['ppl_unigram']:.2f} |",
        "",
        f"Perplexity of chunk {target_chunk} (tokens {target_chunk * chunk_size + 1}-"
        f"{(target_chunk + 1) * chunk_size} of each file, {r['num_context_docs']} files) given k preceding chunks "
        f"of {chunk_size} tokens:",
        "",
        "| context chunks k | " + " | ".join(str(k) for k in r["context_ppl"]) + " |",
        "|---" * (len(r["context_ppl"]) + 1) + "|",
        "| perplexity | " + " | ".join(f"{v:.2f}" for v in r["context_ppl"].values()) + " |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled one)")
    parser.add_argument("--max-doc-tokens", type=int, default=None, help="truncate each held-out file")
    parser.add_argument("--target-chunk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or demo_model_dir()
    model = load_model(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer.model in {model_dir}")
    docs = [d[:args.max_doc_tokens or len(d)] for d in load_heldout(tokenizer)]
    result = evaluate(model, docs, load_unigram_counts(), args.target_chunk)
    print(format_tables(result, model.config.chunk_size, args.target_chunk))


if __name__ == "__main__":
    main()
