"""Decoding cost of structured outputs: tokens/s with and without a JSON-schema grammar, batch 1 and 16.

    python bench/structured_bench.py            # the bundled demo model and tokenizer
    python bench/structured_bench.py --quick    # fewer tokens and rounds (smoke test)

Each row runs B requests of T generated tokens through `LLMEngine.step()` (scheduler, model, the
batched sampler with the grammar's bitmask, detokenization), once unconstrained and once
constrained by a JSON schema whose answer cannot complete within T tokens (an array of objects with
a large `minItems`), so both runs generate exactly B x T tokens. The two variants alternate over
several rounds on one engine and the median of each is reported, with their ratio, from the same
run. Sampling is seeded at temperature 0.8 (the mask is applied before the draw). Prefill is not
timed: the clock starts at the first sampled token. Writes the table and a plot to bench/out/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from megalodon_infer import EngineConfig, LLMEngine, SamplingParams
from megalodon_infer.config import DEMO_MODEL_DIR
from megalodon_infer.sample.params import StructuredOutputsParams
from megalodon_infer.worker.resources import apply_torch_threads

SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 500, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                                     "name": {"type": "string", "maxLength": 12},
                                     "kind": {"enum": ["user", "admin", "guest"]},
                                     "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                              "maxItems": 3}},
    "required": ["id", "name", "kind", "tags"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False}
PROMPT = "Records of the users, as JSON:\n"


def timed_run(engine: LLMEngine, batch: int, tokens: int, constrained: bool, tag: str) -> float:
    """Decode tokens/s of `batch` requests generating `tokens` tokens each (from the first token on)."""
    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    prompt = engine.tokenizer.encode(PROMPT)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(temperature=0.8, seed=i, max_tokens=tokens,
                                                                ignore_eos=True, structured_outputs=spec))
    start, generated = None, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            new = sum(len(delta.token_ids) for delta in output.outputs)
            if new and start is None:
                start = time.perf_counter()
                continue  # the first token closes the prefill step: not decode
            if start is not None:
                generated += new
    assert generated == batch * tokens - 1, generated
    return generated / (time.perf_counter() - start)


def measure(engine: LLMEngine, batch: int, tokens: int, rounds: int) -> dict:
    samples: dict[bool, list[float]] = {False: [], True: []}
    timed_run(engine, batch, 8, True, f"warm-{batch}")  # compiles the grammar, warms the kernels
    for r in range(rounds):
        for constrained in ((False, True) if r % 2 == 0 else (True, False)):
            samples[constrained].append(timed_run(engine, batch, tokens, constrained, f"b{batch}-r{r}-{constrained}"))
    free, grammar = statistics.median(samples[False]), statistics.median(samples[True])
    return {"batch": batch, "free": free, "grammar": grammar, "ratio": grammar / free}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    tokens, rounds = (24, 2) if args.quick else (args.tokens, args.rounds)
    config = EngineConfig(model=args.model, max_num_seqs=max(args.batches), prefix_cache_bytes=0)
    apply_torch_threads(config.torch_threads)
    engine = LLMEngine.from_config(config)
    print(f"{args.model}: {engine.model.num_parameters() / 1e6:.1f}M params, vocab {engine.vocab_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {tokens} tokens per request, "
          f"{rounds} rounds")
    rows = [measure(engine, batch, tokens, rounds) for batch in args.batches]
    lines = ["| batch | tokens/s unconstrained | tokens/s with a JSON-schema grammar | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['free']:.0f} | {r['grammar']:.0f} | {r['ratio']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_bench.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["free"] for r in rows], width=0.4, label="unconstrained")
    ax.bar([x + 0.2 for x in xs], [r["grammar"] for r in rows], width=0.4, label="JSON-schema grammar")
    ax.set(xticks=list(xs), xticklabels=[f"batch {r['batch']}" for r in rows], ylabel="decode tokens/s",
           title="structured outputs: decoding cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "structured_bench.png", dpi=110)
    print(f"wrote {args.out / 'structured_bench.png'}")


if __name__ == "__main__":
    main()
