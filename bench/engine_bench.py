"""Decode throughput and state size: Megalodon vs a transformer of equal size with a growing KV cache.

    python bench/engine_bench.py            # official mega200M shape, vocab 32000, CPU fp32
    python bench/engine_bench.py --quick    # a tiny shape, seconds (smoke test)

For each batch size and context length it times one-token decode steps of the whole model and
prints tokens/s, per-token latency and bytes of state per request, for both models, and their ratio
(measured in the same run: these machines are noisy, ratios travel better than absolute numbers).

NOTE: a decode step's cost depends on the state's size, not on how it was filled, so each model's
state is synthesised at the target context instead of prefilling 32K tokens on a laptop-class CPU:
Megalodon's slot gets position = context (its current chunk holds context mod C random keys), or,
past the first chunk, a position whose chunk is full (C - 1 keys: the most expensive decode step
of the whole chunk cycle); the transformer's cache holds `context` random keys and values.
Configurations whose transformer KV cache would exceed --kv-budget-gb are reported as not fitting,
which is the point of the comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megalodon_infer import ModelConfig, request_state_bytes
from megalodon_infer.model.init import random_model

MEGA_200M = dict(num_layers=12, model_dim=1024, z_dim=256, value_dim=2048, num_heads=1, ffn_hidden_dim=2560,
                 cema_ndim=16, norm_num_groups=32, chunk_size=2048, vocab_size=32000)
QUICK = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=1, ffn_hidden_dim=128,
             cema_ndim=4, norm_num_groups=8, chunk_size=64, vocab_size=512)


class BaselineDecoder(nn.Module):
    """A LLaMA-style decoder (pre-RMSNorm, MHA, SwiGLU) with a preallocated, growing KV cache."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.RMSNorm(dim), "qkv": nn.Linear(dim, 3 * dim, bias=False),
            "out": nn.Linear(dim, dim, bias=False), "norm2": nn.RMSNorm(dim),
            "gate_up": nn.Linear(dim, 2 * ffn, bias=False), "down": nn.Linear(ffn, dim, bias=False),
        }) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def allocate_cache(self, batch: int, max_len: int) -> torch.Tensor:
        """[layers, 2, B, H, max_len, dh]"""
        return torch.randn(len(self.blocks), 2, batch, self.heads, max_len, self.head_dim) * 0.1

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: torch.Tensor, length: int) -> torch.Tensor:
        """tokens [B, 1]; the first `length` cache entries are the context. Returns logits [B, V]."""
        B = tokens.shape[0]
        x = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](blk["norm1"](x)).view(B, 1, 3, self.heads, self.head_dim).unbind(2)
            cache[i, 0, :, :, length] = k[:, 0]
            cache[i, 1, :, :, length] = v[:, 0]
            keys, values = cache[i, 0, :, :, : length + 1], cache[i, 1, :, :, : length + 1]
            att = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)
            x = x + blk["out"](att.transpose(1, 2).reshape(B, 1, -1))
            gate, up = blk["gate_up"](blk["norm2"](x)).chunk(2, dim=-1)
            x = x + blk["down"](F.silu(gate) * up)
        return self.head(self.norm(x))[:, 0]


def matched_baseline(cfg: ModelConfig, megalodon_params: int) -> BaselineDecoder:
    """A baseline with the same width, depth and vocabulary, FFN width chosen to match parameters."""
    D, L, V = cfg.model_dim, cfg.num_layers, cfg.vocab_size
    heads = max(1, D // 64)
    fixed = 2 * V * D + L * (4 * D * D + 2 * D) + D
    ffn = max(8, round((megalodon_params - fixed) / (3 * D * L)))
    return BaselineDecoder(V, D, L, heads, ffn).eval()


@dataclass
class Row:
    model: str
    batch: int
    context: int
    tokens_per_s: float | None
    ms_per_token: float | None
    state_bytes_per_request: int


def time_steps(step, warmup: int, iters: int) -> float:
    """Median seconds of one call of `step` (after warmup)."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def bench_megalodon(model, batch: int, context: int, warmup: int, iters: int) -> Row:
    cfg = model.config
    state = model.init_state(batch)
    C = cfg.chunk_size
    # Worst case: beyond one chunk, time the step with a full chunk (C - 1 keys), not with whatever
    # context % C happens to be (8K and 32K are multiples of C: an empty chunk, the cheapest step).
    position = context if context < C else (context // C) * C - 1
    fill = position % C
    state.position[:] = position
    state.keys[:, :, :fill].normal_(0, 0.1)
    state.values[:, :, :fill].normal_(0, 0.1)
    state.cema_h.real.normal_(0, 0.1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1))

    def step():
        # stay at the same context: rewind after each step (positions, not contents, set the cost)
        model(tokens, state)
        state.position[:] = position

    seconds = time_steps(step, warmup, iters)
    kv_dtype = state.keys.dtype
    return Row("megalodon", batch, context, batch / seconds, seconds * 1e3,
               request_state_bytes(cfg, kv_dtype=kv_dtype, num_kv=fill))


def bench_baseline(model: BaselineDecoder, batch: int, context: int, warmup: int, iters: int,
                   budget_bytes: float) -> Row:
    layers, heads, dh = len(model.blocks), model.heads, model.head_dim
    per_request = 2 * layers * heads * dh * context * 4
    if per_request * batch > budget_bytes:
        return Row("transformer", batch, context, None, None, per_request)
    cache = model.allocate_cache(batch, context + 1)
    tokens = torch.randint(0, model.embed.num_embeddings, (batch, 1))
    seconds = time_steps(lambda: model.decode(tokens, cache, context), warmup, iters)
    return Row("transformer", batch, context, batch / seconds, seconds * 1e3, per_request)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render_table(rows: list[Row]) -> str:
    by_key = {(r.model, r.batch, r.context): r for r in rows}
    lines = ["| batch | context | Megalodon tok/s | transformer tok/s | speed ratio | Megalodon ms/token "
             "| transformer ms/token | state/request Megalodon | KV/request transformer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.model != "megalodon":
            continue
        b = by_key[("transformer", r.batch, r.context)]
        ratio = f"{r.tokens_per_s / b.tokens_per_s:.2f}x" if b.tokens_per_s else "baseline does not fit"
        b_tps = f"{b.tokens_per_s:.1f}" if b.tokens_per_s else "-"
        b_ms = f"{b.ms_per_token:.1f}" if b.ms_per_token else "-"
        lines.append(f"| {r.batch} | {r.context:,} | {r.tokens_per_s:.1f} | {b_tps} | {ratio} | {r.ms_per_token:.1f} "
                     f"| {b_ms} | {fmt_bytes(r.state_bytes_per_request)} | {fmt_bytes(b.state_bytes_per_request)} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r.context for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, style in (("megalodon", "-o"), ("transformer", "--s")):
        for ctx in contexts:
            pts = [(r.batch, r.tokens_per_s) for r in rows if r.model == model and r.context == ctx and r.tokens_per_s]
            if pts:
                axes[0].plot(*zip(*pts, strict=True), style, label=f"{model} @ {ctx:,}")
        sizes = [(r.context, r.state_bytes_per_request / 2**20) for r in rows if r.model == model and r.batch == 1]
        axes[1].plot(*zip(*sizes, strict=True), style, label=model)
    axes[0].set(xlabel="batch size", ylabel="decode tokens/s", xscale="log", title="decode throughput")
    axes[1].set(xlabel="context tokens", ylabel="MiB per request", xscale="log", yscale="log",
                title="state per request")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and contexts (smoke test)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--kv-budget-gb", type=float, default=8.0, help="largest baseline KV cache to allocate")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else MEGA_200M
    contexts = [100, 300] if args.quick else args.contexts
    batches = [1, 4] if args.quick else args.batches
    iters, warmup = (2, 1) if args.quick else (args.iters, 2)
    cfg = ModelConfig(**shape)
    mega = random_model(cfg, seed=0, randomize_all=False)
    mega_params = mega.num_parameters()
    base = matched_baseline(cfg, mega_params)
    base_params = sum(p.numel() for p in base.parameters())
    print(f"Megalodon {mega_params / 1e6:.1f}M params (chunk {cfg.chunk_size}), transformer baseline "
          f"{base_params / 1e6:.1f}M params; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    rows = []
    for ctx in contexts:
        for batch in batches:
            rows.append(bench_megalodon(mega, batch, ctx, warmup, iters))
            rows.append(bench_baseline(base, batch, ctx, warmup, iters, args.kv_budget_gb * 2**30))
            print(f"  done batch {batch} context {ctx}", flush=True)
    table = render_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_bench.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    (args.out / "engine_bench.md").write_text(table + "\n")
    plot(rows, args.out / "engine_bench.png")
    print(f"wrote {args.out / 'engine_bench.png'}")


if __name__ == "__main__":
    main()
