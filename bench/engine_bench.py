"""Decode cost vs context length: the whole engine step, and Megalodon vs an equal-size transformer.

    python bench/engine_bench.py            # official mega200M shape, vocab 32000, CPU fp32
    python bench/engine_bench.py --quick    # a tiny shape, seconds (smoke test)

Part 1 times `LLMEngine.step()` itself (scheduler, model runner, sampling with temperature/top-p and
a repetition penalty, detokenization with the bundled tokenizer, a stop string, outputs) for a batch
of requests whose prompts really are `context` tokens long, and reports ms per decode step at each
context with its ratio to the shortest context (measured in the same run). Anything in the engine
whose per-token cost grows with the context shows up here, not only in the model.

Part 2 times one-token decode steps of the model alone (through the same worker the engine uses)
against a LLaMA-style transformer of equal size with a growing KV cache, and prints tokens/s,
per-token latency and bytes of state per request, for both models, and their ratio.

NOTE: a decode step's cost depends on the state's size, not on how it was filled, so each model's
state is synthesised at the target context instead of prefilling 128K tokens on a laptop-class CPU.
In part 1 the synthesised state enters the engine the way a conversation's state does: it is stored
in the prefix cache under the prompt's tokens, so each request is admitted as a whole-prompt hit.
In part 2:
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megalodon_infer import EngineConfig, LLMEngine, ModelConfig, SamplingParams, request_state_bytes
from megalodon_infer.config import DEMO_MODEL_DIR
from megalodon_infer.core.state_pool import SlotSnapshot
from megalodon_infer.model.init import random_model
from megalodon_infer.tokenization.tokenizer import Tokenizer
from megalodon_infer.worker.model_runner import ModelRunner
from megalodon_infer.worker.resources import apply_torch_threads

MEGA_200M = dict(num_layers=12, model_dim=1024, z_dim=256, value_dim=2048, num_heads=1, ffn_hidden_dim=2560,
                 cema_ndim=16, norm_num_groups=32, chunk_size=2048, vocab_size=32000)
QUICK = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=1, ffn_hidden_dim=128,
             cema_ndim=4, norm_num_groups=8, chunk_size=64, vocab_size=4096)


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


def timed_position(context: int, chunk_size: int) -> int:
    """Where to time a decode step "at" `context`: beyond the first chunk, a position whose chunk is
    full (C - 1 keys, the most expensive step of the chunk cycle), not whatever context % C is (8K
    and 32K are multiples of C: an empty chunk, the cheapest step)."""
    return context if context < chunk_size else (context // chunk_size) * chunk_size - 1


def bench_megalodon(model, batch: int, context: int, warmup: int, iters: int) -> Row:
    cfg = model.config
    state = model.allocate_state(batch)
    position = timed_position(context, cfg.chunk_size)
    fill = position % cfg.chunk_size
    state.position[:] = position
    state.keys[:, :, :fill].normal_(0, 0.1)
    state.values[:, :, :fill].normal_(0, 0.1)
    state.cema_h.real.normal_(0, 0.1)
    runner = ModelRunner(model, state)
    slots = list(range(batch))
    tokens = torch.randint(0, cfg.vocab_size, (batch,)).tolist()

    def step():
        # stay at the same context: rewind after each step (positions, not contents, set the cost)
        runner.decode(slots, tokens)
        state.position[:] = position

    seconds = time_steps(step, warmup, iters)
    kv_dtype = state.keys.dtype
    return Row("megalodon", batch, context, batch / seconds, seconds * 1e3,
               request_state_bytes(cfg, kv_dtype=kv_dtype, num_kv=fill))


@dataclass
class EngineRow:
    batch: int
    context: int  # prompt tokens of each request when the timed steps start
    ms_per_step: float
    tokens_per_s: float


def synthetic_snapshot(model, position: int, generator: torch.Generator) -> SlotSnapshot:
    """A state after `position` tokens: random CEMA state and statistics, a chunk holding position % C keys."""
    cfg = model.config
    fill = position % cfg.chunk_size
    state = model.allocate_state(1)
    G, H, dz, dv = cfg.norm_num_groups, cfg.num_heads, cfg.head_z_dim, cfg.head_value_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    return SlotSnapshot(
        position=position, norm_mean=rand(cfg.num_layers + 1, G), norm_var=rand(cfg.num_layers + 1, G).abs() + 1,
        cema_h=torch.complex(rand(cfg.num_layers, cfg.model_dim, cfg.cema_ndim),
                             rand(cfg.num_layers, cfg.model_dim, cfg.cema_ndim)).to(state.cema_h.dtype),
        keys=rand(cfg.num_layers, fill, H, dz).to(state.keys.dtype),
        values=rand(cfg.num_layers, fill, H, dv).to(state.values.dtype))


def bench_engine_steps(model, tokenizer: Tokenizer | None, batch: int, contexts: list[int], warmup: int,
                       iters: int, rounds: int) -> list[EngineRow]:
    """Median ms of `engine.step()` decoding `batch` requests whose prompts are `context` tokens, per context.

    One engine; in each of `rounds` rounds every context is timed in turn (interleaved, so a noisy
    neighbour affects them alike): a batch of requests is admitted as whole-prompt cache hits, timed
    for `iters` steps after `warmup`, and aborted. Contexts share a chunk fill (context % C), so the
    rows differ only in how long the context is.
    """
    cfg = model.config
    generator = torch.Generator().manual_seed(batch)
    vocab = tokenizer.vocab_size if tokenizer else cfg.vocab_size
    prompts = {ctx: torch.randint(0, vocab, (ctx,), generator=generator).tolist() for ctx in contexts}
    snapshots = {ctx: synthetic_snapshot(model, ctx, generator) for ctx in contexts}
    engine = LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=batch, max_num_batched_tokens=max(batch, 256), max_model_len=None,
        prefix_cache_bytes=2 * sum(snap.nbytes() for snap in snapshots.values()) + (1 << 24)))
    for ctx in contexts:
        engine.prefix_cache.insert_final(prompts[ctx], snapshots[ctx], torch.randn(cfg.effective_output_size))
    params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, stop=["\n\n\n\n"], seed=0,
                            ignore_eos=True, max_tokens=warmup + iters + 2)
    samples: dict[int, list[float]] = {ctx: [] for ctx in contexts}
    for round_index in range(rounds):
        for ctx in contexts:
            ids = [f"r{round_index}-{ctx}-{i}" for i in range(batch)]
            for request_id in ids:
                engine.add_request(request_id, prompts[ctx], params)
            engine.step()  # admission: every prompt is found whole in the cache, sampled from its stored logits
            assert all(engine.requests[r].num_cached_tokens == ctx for r in ids), "the state was not restored"
            for _ in range(warmup):
                engine.step()
            for _ in range(iters):
                t0 = time.perf_counter()
                engine.step()
                samples[ctx].append(time.perf_counter() - t0)
            for request_id in ids:
                engine.abort_request(request_id)
            engine.step()
    return [EngineRow(batch, ctx, statistics.median(samples[ctx]) * 1e3, batch / statistics.median(samples[ctx]))
            for ctx in contexts]


def render_engine_table(rows: list[EngineRow]) -> str:
    lines = ["| batch | context (tokens) | engine step ms | tokens/s | vs shortest context |", "|---|---|---|---|---|"]
    shortest = {}
    for r in rows:
        base = shortest.setdefault(r.batch, r)
        lines.append(f"| {r.batch} | {r.context:,} | {r.ms_per_step:.2f} | {r.tokens_per_s:.1f} "
                     f"| {r.ms_per_step / base.ms_per_step:.3f}x |")
    return "\n".join(lines)


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


def plot_engine(rows: list[EngineRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r.batch for r in rows}):
        pts = [(r.context, r.ms_per_step) for r in rows if r.batch == batch]
        ax.plot(*zip(*pts, strict=True), "-o", label=f"batch {batch}")
    ax.set(xlabel="context tokens", ylabel="ms per engine decode step", xscale="log", ylim=(0, None),
           title="whole engine step vs context")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def save(stem: Path, rows: list, table: str, plot_rows: Callable[[list, Path], None]) -> None:
    """Print the table; write it (.md), the rows (.json) and the plot (.png) beside `stem`."""
    print(table)
    stem.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    stem.with_suffix(".md").write_text(table + "\n")
    plot_rows(rows, stem.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and contexts (smoke test)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the contexts (part 1)")
    parser.add_argument("--kv-budget-gb", type=float, default=8.0, help="largest baseline KV cache to allocate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's policy)")
    parser.add_argument("--skip-baseline", action="store_true", help="part 1 only")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    apply_torch_threads(args.threads)  # the product's policy unless --threads says otherwise
    shape = QUICK if args.quick else MEGA_200M
    contexts = [100, 300] if args.quick else args.contexts
    batches = [1, 4] if args.quick else args.batches
    iters, warmup = (2, 1) if args.quick else (args.iters, 2)
    cfg = ModelConfig(**shape)
    mega = random_model(cfg, seed=0, randomize_all=False)
    mega_params = mega.num_parameters()
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"Megalodon {mega_params / 1e6:.1f}M params (chunk {cfg.chunk_size}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32 CPU")

    C = cfg.chunk_size
    fill = min(C // 2, min(contexts))
    aligned = [(ctx // C) * C + fill if ctx >= C else ctx for ctx in contexts]
    engine_rows = []
    for batch in batches:
        rows = bench_engine_steps(mega, tokenizer, batch, aligned, warmup, iters, args.rounds)
        engine_rows += rows
        for row in rows:
            print(f"  engine step: batch {batch} context {row.context:,} {row.ms_per_step:.2f} ms", flush=True)
    save(args.out / "engine_step_bench", engine_rows, render_engine_table(engine_rows), plot_engine)
    if args.skip_baseline:
        return

    base = matched_baseline(cfg, mega_params)
    base_params = sum(p.numel() for p in base.parameters())
    print(f"transformer baseline {base_params / 1e6:.1f}M params")
    rows = []
    for ctx in contexts:
        for batch in batches:
            rows.append(bench_megalodon(mega, batch, ctx, warmup, iters))
            rows.append(bench_baseline(base, batch, ctx, warmup, iters, args.kv_budget_gb * 2**30))
            print(f"  done batch {batch} context {ctx}", flush=True)
    save(args.out / "engine_bench", rows, render_table(rows), plot)
    print(f"wrote {args.out / 'engine_step_bench.png'} and {args.out / 'engine_bench.png'}")


if __name__ == "__main__":
    main()
