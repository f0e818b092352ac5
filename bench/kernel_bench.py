"""CPU benchmark: reference (eager torch) vs fused C++ decode kernels, per op and for the whole model.

Usage: python bench/kernel_bench.py [--model mega200M|small] [--batches 1 32] [--fill 1024] [--threads N]

Model: the official mega200M shape (12 layers, D=1024, Z=256, E=2048, 1 head, F=2560, N=16, G=32,
C=2048) with vocab 32000 and random weights (official init) in fp32; K/V stored in bf16 so batch 32
fits in memory. Every slot starts at position `--fill` (a half-full chunk) with random state, which
is all the timing depends on. Both paths run in this process on the same weights and identical
state copies, so their ratio is measured under the same machine load. Prints a markdown table and
writes bench/out/kernel_bench.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalodon_infer import ModelConfig  # noqa: E402
from megalodon_infer.kernels import decode, load_cpu_extension  # noqa: E402
from megalodon_infer.model.init import random_model  # noqa: E402
from megalodon_infer.model.megalodon import Megalodon  # noqa: E402
from megalodon_infer.model.state import MegalodonState, allocate_state  # noqa: E402
from megalodon_infer.worker.decode_ops import build_decode_ops  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
MODELS = {
    "mega200M": dict(num_layers=12, model_dim=1024, z_dim=256, value_dim=2048, num_heads=1, ffn_hidden_dim=2560,
                     cema_ndim=16, norm_num_groups=32, chunk_size=2048, vocab_size=32000),
    "small": dict(num_layers=2, model_dim=256, z_dim=64, value_dim=512, num_heads=2, ffn_hidden_dim=512,
                  cema_ndim=16, norm_num_groups=16, chunk_size=512, vocab_size=4096),
}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def median_seconds(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_state(model: Megalodon, batch: int, fill: int, seed: int) -> MegalodonState:
    """A state whose every slot sits at position `fill` with random statistics, CEMA state and KV."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    state = allocate_state(cfg, batch, torch.bfloat16, torch.float32, "cpu")
    state.position.fill_(fill)
    state.norm_mean.copy_(torch.randn(state.norm_mean.shape, generator=g) * 0.1)
    state.norm_var.copy_(torch.rand(state.norm_var.shape, generator=g) + 0.5)
    state.cema_h.copy_(torch.randn(state.cema_h.shape, dtype=torch.complex64, generator=g) * 0.1)
    for pool in (state.keys, state.values):
        for layer in range(cfg.num_layers):  # layer by layer: an fp32 temporary of the whole pool is GBs
            pool[layer].copy_(torch.randn(pool[layer].shape, generator=g))
    return state


def op_timings(model: Megalodon, state: MegalodonState, batch: int, iters: int) -> list[dict]:
    """Layer-0 TimestepNorm+CEMA and attention decode: reference vs fused on the same inputs."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    slot_ids = torch.arange(batch)
    tsn, cema = build_decode_ops(model, torch.bfloat16, "fused").layers[0]
    x = torch.randn(batch, cfg.model_dim, generator=g)
    H, dz, dv = cfg.num_heads, cfg.head_z_dim, cfg.head_value_dim
    q = torch.randn(batch, H, dz, generator=g) / dz**0.5
    k_new = torch.randn(batch, H, dz, generator=g).bfloat16()
    v_new = torch.randn(batch, H, dv, generator=g).bfloat16()
    mean, var, h = state.norm_mean[0], state.norm_var[0], state.cema_h[0]
    keys, values = state.keys[0], state.values[0]
    rows = []
    for name, ref, fused, n in [
        ("TimestepNorm + CEMA step", lambda: decode.tsn_cema_decode_step_ref(x, slot_ids, state.position, mean, var,
                                                                            h, tsn, cema),
         lambda: decode.tsn_cema_decode_step(x, slot_ids, state.position, mean, var, h, tsn, cema), iters * 5),
        ("attention decode (bf16 KV)", lambda: decode.attention_decode_ref(q, k_new, v_new, keys, values, slot_ids,
                                                                          state.position),
         lambda: decode.attention_decode(q, k_new, v_new, keys, values, slot_ids, state.position), iters),
    ]:
        t_ref, t_fused = median_seconds(ref, n), median_seconds(fused, n)
        rows.append(dict(what=f"{name}, one layer", batch=batch, unit="ms", reference=t_ref * 1e3,
                         fused=t_fused * 1e3, speedup=t_ref / t_fused))
    return rows


def model_timing(model: Megalodon, batch: int, fill: int, steps: int) -> dict:
    """Whole-model decode tokens/s (embedding to logits), reference vs fused, from identical states."""
    tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(2))
    slot_ids = torch.arange(batch)
    result = {}
    for mode in ("reference", "fused"):
        ops = build_decode_ops(model, torch.bfloat16, mode)
        state = random_state(model, batch, fill, seed=3)
        seconds = median_seconds(lambda s=state, o=ops: model.decode_step(tokens, s, slot_ids, o), steps)
        result[mode] = batch / seconds
        del state
    return dict(what="whole-model decode step", batch=batch, unit="tokens/s", reference=result["reference"],
                fused=result["fused"], speedup=result["fused"] / result["reference"])


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| measurement | batch | reference | fused | fused / reference |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['batch']} | {r['reference']:.3g} {r['unit']} | {r['fused']:.3g} {r['unit']} "
                     f"| {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"NOTE: matplotlib is not installed; no plot written to {path}")
        return
    short = {"TimestepNorm + CEMA step, one layer": "TSN + CEMA\n(1 layer)",
             "attention decode (bf16 KV), one layer": "attention\n(1 layer)",
             "whole-model decode step": "whole model\n(tokens/s)"}
    labels = [f"{short.get(r['what'], r['what'])}\nbatch {r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.bar_label(bars, labels=[f"{r['speedup']:.2f}x" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("fused / reference (speed)")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mega200M")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--fill", type=int, default=1024, help="starting position of every slot (keys in the chunk)")
    parser.add_argument("--steps", type=int, default=5, help="timed whole-model steps per path and batch")
    parser.add_argument("--iters", type=int, default=10, help="timed repetitions of each single-op measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both paths (on a shared machine, OpenMP barriers stall on a busy "
                             "core: fewer threads than cores gives steadier numbers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_cpu_extension()
    cfg = ModelConfig(**MODELS[args.model])
    model = random_model(cfg, seed=0, dtype=torch.float32, randomize_all=False)
    rows = []
    for batch in args.batches:
        state = random_state(model, batch, args.fill, seed=3)
        rows += op_timings(model, state, batch, args.iters)
        del state
        rows.append(model_timing(model, batch, args.fill, args.steps))
        print(markdown(rows[-3:], f"batch {batch} done"), flush=True)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = (f"CPU decode, {args.model} shape (vocab {cfg.vocab_size}), fp32 weights, bf16 KV, fill {args.fill}; "
              f"{machine}; {date.today().isoformat()}")
    table = markdown(rows, header)
    print("\n" + table)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "kernel_bench.md").write_text(table + "\n")
    (OUT_DIR / "kernel_bench.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))
    plot(rows, OUT_DIR / "kernel_bench.png", header)


if __name__ == "__main__":
    main()
