"""Measure the bundled demo model against the model it replaced; print the README's markdown tables.

    python scripts/eval_demo.py                      # the README's numbers (both models; ~16 min on 2 cores)
    python scripts/eval_demo.py --model path/to/model --baseline-rev e9bdf43 --max-doc-tokens 1024

The evaluation text is pip, setuptools and wheel (tests/data/demo_heldout.jsonl, written by
`train_demo.py`), which neither model trained on. Reports, for each model with its own tokenizer:

- perplexity over each file's first `--max-doc-tokens` tokens, from a fresh state, through the
  stateful forward one chunk at a time (the decode path's state handling), and the same as bits
  per byte of source text, which compares models with different tokenizers;
- the held-out text's own unigram perplexity (token frequencies of that very text: a model must
  use context to beat it), and the ratio;
- the perplexity of chunk 16 of each long file given k = 0..16 preceding chunks;
- greedy completions of five fixed prompts and decode tokens/s at batch 1, both through `LLM`
  (the server's engine: scheduler, fused CPU kernels, default thread policy).

The baseline is the previous demo model, read from git history (`--baseline-rev`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megalodon_infer import LLM, SamplingParams, load_model  # noqa: E402
from megalodon_infer.model.megalodon import Megalodon  # noqa: E402
from megalodon_infer.tokenization.tokenizer import Tokenizer  # noqa: E402
from tools.demo_scoring import (  # noqa: E402
    committed_demo_file,
    context_nll,
    demo_model_dir,
    load_eval_texts,
    own_unigram_nll,
    sequence_nll,
)

BASELINE_REV = "e9bdf43"  # the last commit with the 4M-parameter stdlib-only demo model
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")
CONTEXT_CHUNKS = (0, 1, 2, 4, 8, 16)
TARGET_CHUNK = 16
PROMPTS = (
    "def fibonacci(n):\n",
    "def is_prime(n):\n",
    "import os\n\n\ndef read_config(path):\n",
    "class Stack:\n    def __init__(self):\n",
    'def parse_args(argv=None):\n    """Parse command-line arguments."""\n',
)


def baseline_dir(rev: str, dest: Path) -> Path:
    """The demo model as committed at `rev`, copied out of git history into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        (dest / name).write_bytes(committed_demo_file(rev, name))
    return dest


@torch.no_grad()
def score(model: Megalodon, tokenizer: Tokenizer, texts: list[str], max_doc_tokens: int) -> dict:
    docs = [tokenizer.encode(t, add_bos=True, add_eos=True, parse_special_tokens=False)[:max_doc_tokens + 1]
            for t in texts]
    num_bytes = sum(len(tokenizer.decode(d[1:]).encode()) for d in docs)
    nll = torch.cat([sequence_nll(model, torch.tensor([d]))[0].double() for d in docs])
    unigram = own_unigram_nll([t for d in docs for t in d[1:]])
    C = model.config.chunk_size
    long_docs = [d for d in docs if len(d) >= (TARGET_CHUNK + 1) * C + 1]
    context = {k: math.exp(context_nll(model, long_docs, TARGET_CHUNK, k).double().mean().item())
               for k in CONTEXT_CHUNKS}
    return {"num_docs": len(docs), "num_tokens": len(nll), "num_bytes": num_bytes,
            "ppl": math.exp(nll.mean().item()), "bits_per_byte": nll.sum().item() / math.log(2) / num_bytes,
            "ppl_own_unigram": math.exp(unigram.mean().item()), "num_context_docs": len(long_docs),
            "context_ppl": context}


def generate(model_dir: Path, num_tokens: int) -> dict:
    """Greedy samples and batch-1 decode speed through the engine (best of 3 timed runs)."""
    llm = LLM(model_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=96)
    samples = [out.outputs[0].text for out in llm.generate(list(PROMPTS), greedy)]
    timed = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        out = llm.generate(PROMPTS[0], timed)[0]
        best = min(best, time.perf_counter() - start)
    assert len(out.outputs[0].token_ids) == num_tokens
    return {"samples": samples, "tokens_per_s": num_tokens / best}


def evaluate(model_dir: Path, texts: list[str], max_doc_tokens: int, num_tokens: int) -> dict:
    model = load_model(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    if tokenizer is None:
        raise SystemExit(f"no tokenizer.model in {model_dir}")
    result = score(model, tokenizer, texts, max_doc_tokens)
    result.update(generate(model_dir, num_tokens), num_parameters=model.num_parameters(),
                  vocab_size=model.config.vocab_size, num_layers=model.config.num_layers,
                  model_dim=model.config.model_dim)
    return result


def format_tables(new: dict, old: dict, max_doc_tokens: int, num_tokens: int) -> str:
    rows = [("this demo model", new), ("previous demo model", old)]
    lines = [
        f"Evaluation text: pip 24.2, setuptools 75.1.0, wheel 0.44.0 ({new['num_docs']} files, each file's first "
        f"{max_doc_tokens} tokens; {new['num_bytes'] / 1e6:.2f} MB of source). Own unigram: the token "
        "frequencies of that same text.",
        "",
        "| model | parameters | vocab | perplexity | own-unigram perplexity | ratio | bits/byte | "
        f"decode tok/s (batch 1, {num_tokens} tokens) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(f"| {name} ({r['num_layers']} layers, D={r['model_dim']}) | {r['num_parameters'] / 1e6:.1f}M | "
                     f"{r['vocab_size']} | {r['ppl']:.2f} | {r['ppl_own_unigram']:.1f} | "
                     f"{r['ppl'] / r['ppl_own_unigram']:.3f} | {r['bits_per_byte']:.3f} | {r['tokens_per_s']:.0f} |")
    lines += [
        "",
        f"Perplexity of chunk {TARGET_CHUNK} (64 tokens) of each file at least {TARGET_CHUNK + 1} chunks long "
        f"({new['num_context_docs']} files, this model's tokens) given k preceding chunks; k = {TARGET_CHUNK} "
        "reaches back to the file's first token:",
        "",
        "| model | " + " | ".join(f"k={k}" for k in CONTEXT_CHUNKS) + " |",
        "|---" * (len(CONTEXT_CHUNKS) + 1) + "|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r['context_ppl'][k]:.2f}" for k in CONTEXT_CHUNKS) + " |")
    lines += ["", "Greedy completions (96 tokens at most):", ""]
    for prompt, new_text, old_text in zip(PROMPTS, new["samples"], old["samples"], strict=True):
        lines += [f"Prompt `{prompt!r}`", "", "this model:", "```python", prompt + new_text, "```",
                  "previous model:", "```python", prompt + old_text, "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled one)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision holding the baseline model")
    parser.add_argument("--max-doc-tokens", type=int, default=1088, help="score each file's first N tokens")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()
    texts = load_eval_texts()
    with tempfile.TemporaryDirectory() as tmp:
        old = evaluate(baseline_dir(args.baseline_rev, Path(tmp)), texts, args.max_doc_tokens, args.decode_tokens)
    new = evaluate(args.model or demo_model_dir(), texts, args.max_doc_tokens, args.decode_tokens)
    print(format_tables(new, old, args.max_doc_tokens, args.decode_tokens))
    if args.json:
        args.json.write_text(json.dumps({"new": new, "old": old}, indent=2) + "\n")


if __name__ == "__main__":
    main()
