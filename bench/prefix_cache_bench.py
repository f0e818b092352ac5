"""Time to first token of a chat's second turn, prefix cache on vs off, for growing histories.

    python bench/prefix_cache_bench.py                 # the bundled demo model
    python bench/prefix_cache_bench.py --quick         # tiny random model, seconds

Turn 1 is a history of H chunks plus a reply; turn 2 sends history + reply + a new message. With the
cache on, turn 1 has already run (untimed) and turn 2 resumes from the finished state, prefilling
only the new message; with it off, turn 2 prefills everything. Both are measured in the same run,
several times each (median), and the table shows the ratio. Writes a plot to bench/out/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from megalodon_infer import ModelConfig, SamplingParams, load_model
from megalodon_infer.config import EngineConfig
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.model.init import random_model

QUICK = ModelConfig(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=1, ffn_hidden_dim=128,
                    cema_ndim=4, norm_num_groups=8, chunk_size=32, vocab_size=512)


def time_to_first_token(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int) -> tuple[float, list]:
    """Seconds from add_request to the first sampled token; runs the request to the end."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    ttft, tokens = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            for delta in out.outputs:
                if delta.token_ids and ttft is None:
                    ttft = time.perf_counter() - start
                tokens += delta.token_ids
    return ttft, tokens


def measure(model, history_chunks: int, repeats: int, budget: int) -> dict:
    C = model.config.chunk_size
    g = torch.Generator().manual_seed(history_chunks)
    vocab = model.config.vocab_size
    history = torch.randint(3, vocab, (history_chunks * C + C // 3,), generator=g).tolist()
    new_message = torch.randint(3, vocab, (C // 4,), generator=g).tolist()
    results = {}
    for cache_on in (False, True):
        samples = []
        for r in range(repeats):
            engine = LLMEngine(model, None, EngineConfig(max_num_seqs=2, max_num_batched_tokens=budget,
                                                         max_model_len=1 << 20,
                                                         prefix_cache_bytes=(1 << 30) if cache_on else 0))
            _, reply = time_to_first_token(engine, f"turn1-{r}", history, max_tokens=8)  # untimed warm turn
            turn2 = history + reply + new_message
            ttft, _ = time_to_first_token(engine, f"turn2-{r}", turn2, max_tokens=1)
            samples.append(ttft)
        results["on" if cache_on else "off"] = statistics.median(samples)
    results.update(chunks=history_chunks, tokens=len(history) + 8 + len(new_message))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: bundled demo model)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2048, help="prefill token budget per engine step")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    if args.quick:
        model, name = random_model(QUICK, seed=0, randomize_all=False), "tiny random model"
        chunks, repeats = [1, 4], 1
    else:
        from megalodon_infer.config import DEMO_MODEL_DIR

        path = args.model or DEMO_MODEL_DIR
        model, name = load_model(path), str(path)
        chunks, repeats = args.chunks, args.repeats
    print(f"{name}: chunk_size {model.config.chunk_size}, {model.num_parameters() / 1e6:.1f}M params, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [measure(model, h, repeats, args.budget) for h in chunks]
    lines = ["| history (chunks) | turn-2 prompt tokens | TTFT cache off | TTFT cache on | speed-up |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunks']} | {r['tokens']:,} | {r['off'] * 1e3:.1f} ms | {r['on'] * 1e3:.1f} ms "
                     f"| {r['off'] / r['on']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache_bench.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["chunks"] for r in rows]
    ax.plot(xs, [r["off"] * 1e3 for r in rows], "--s", label="cache off (prefill everything)")
    ax.plot(xs, [r["on"] * 1e3 for r in rows], "-o", label="cache on (resume the finished state)")
    ax.set(xscale="log", yscale="log", xlabel="history length (chunks)", ylabel="turn-2 TTFT (ms)",
           title="second chat turn: time to first token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "prefix_cache_bench.png", dpi=110)
    print(f"wrote {args.out / 'prefix_cache_bench.png'}")


if __name__ == "__main__":
    main()
