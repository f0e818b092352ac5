"""GPU decode benchmark for the official 7B shape (run by scripts/gpu_check.sh on one H200).

1. Decode step time, reference eager vs fused eager vs fused + CUDA graph, at several batch sizes.
   Model: mega7.1B (D=4096, 4 heads, Z=1024, E=8192, F=11264, N=16, G=64, C=2048, vocab 32000) with
   random bf16 weights and bf16 KV, but only `--layers` of its 32 blocks, so that batch 256's state
   fits (each block holds 37.7 MB of K/V per slot at a full chunk) and the run fits its time budget;
   the embedding and LM head are included. Every slot starts at position `--fill`.
2. Attention-decode kernel bandwidth: K/V bytes read per call / kernel time, for one 7B layer at a
   full chunk, against the device-to-device copy bandwidth measured in the same run (bytes read +
   written / time). L2 is flushed before each timed call.

Writes gpu_bench.json and gpu_bench.md into --out and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalodon_infer import ModelConfig  # noqa: E402
from megalodon_infer.cuda_graphs import DecodeGraphRunner  # noqa: E402
from megalodon_infer.kernels import decode, load_cuda_extension  # noqa: E402
from megalodon_infer.model.megalodon import Megalodon  # noqa: E402
from megalodon_infer.model.state import MegalodonState, allocate_state  # noqa: E402

SHAPE_7B = dict(model_dim=4096, z_dim=1024, value_dim=8192, num_heads=4, ffn_hidden_dim=11264, cema_ndim=16,
                norm_num_groups=64, chunk_size=2048, vocab_size=32000)
DEVICE = torch.device("cuda")


def build_model(num_layers: int) -> Megalodon:
    """Random weights drawn on the GPU (any values keep CEMA stable: |q| < 1 by construction)."""
    cfg = ModelConfig(num_layers=num_layers, **SHAPE_7B)
    with torch.device(DEVICE):
        model = Megalodon(cfg)
    gen = torch.Generator(DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 / (3.0 * p.shape[-1]) ** 0.5 if p.dim() == 2 and "embed" not in name else 0.2
            p.normal_(0.0, std, generator=gen)
    return model.prepare_for_inference(torch.bfloat16, DEVICE)


def random_state(model: Megalodon, slots: int, fill: int) -> MegalodonState:
    state = allocate_state(model.config, slots, torch.bfloat16, torch.float32, DEVICE)
    state.position.fill_(fill)
    state.norm_var.uniform_(0.5, 1.5)
    torch.view_as_real(state.cema_h).normal_(0.0, 0.1)
    state.keys.normal_()
    state.values.normal_()
    return state


def cuda_time_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over iters, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_timings(model: Megalodon, batch: int, fill: int, iters: int) -> dict:
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=DEVICE)
    slot_ids = torch.arange(batch, device=DEVICE)
    row = dict(batch=batch)
    for mode in ("reference", "fused"):
        model.set_decode_kernels(mode)
        state = random_state(model, batch, fill)
        row[f"{mode}_ms"] = cuda_time_ms(lambda s=state: model.decode_step(tokens, s, slot_ids), iters)
        del state
    state = random_state(model, batch + 1, fill)  # one extra slot for graph padding
    runner = DecodeGraphRunner(model, state, pad_slot=batch, buckets=(batch,))
    runner.capture()
    if runner.captured_buckets != (batch,):
        raise RuntimeError(f"CUDA graph capture failed at batch {batch} (see the log above)")
    row["graph_ms"] = cuda_time_ms(lambda r=runner: r.step(tokens, slot_ids), iters)
    del runner, state
    torch.cuda.empty_cache()
    return row


def copy_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


def attention_bandwidth(batch: int, iters: int) -> dict:
    """One 7B layer's attention decode at a full chunk (fill C-1): K/V bytes read / kernel time."""
    C, H, dz, dv = SHAPE_7B["chunk_size"], SHAPE_7B["num_heads"], 256, 2048
    keys = torch.empty(batch, C, H, dz, dtype=torch.bfloat16, device=DEVICE).normal_()
    values = torch.empty(batch, C, H, dv, dtype=torch.bfloat16, device=DEVICE).normal_()
    position = torch.full((batch,), C - 1, dtype=torch.long, device=DEVICE)
    slot_ids = torch.arange(batch, device=DEVICE)
    q = torch.randn(batch, H, dz, device=DEVICE) / dz**0.5
    k_new = torch.randn(batch, H, dz, device=DEVICE).bfloat16()
    v_new = torch.randn(batch, H, dv, device=DEVICE).bfloat16()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)  # > L2, so every call reads HBM
    times = []
    for i in range(iters + 2):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode.attention_decode(q, k_new, v_new, keys, values, slot_ids, position)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    nbytes = batch * C * H * (dz + dv) * 2
    return dict(batch=batch, ms=ms, gbs=nbytes / (ms * 1e-3) / 1e9, mbytes=nbytes / 1e6)


def tables(results: dict) -> str:
    layers = results["layers"]
    lines = [f"Decode step, mega7.1B shape with {layers} of 32 layers (+ embedding and LM head), random bf16 weights, "
             f"bf16 KV, fill {results['fill']}; {results['device']}, torch {results['torch']}", "",
             "| batch | reference eager | fused eager | fused + CUDA graph | graph vs reference | tokens/s (graph) |",
             "|---|---|---|---|---|---|"]
    for r in results["decode"]:
        lines.append(f"| {r['batch']} | {r['reference_ms']:.2f} ms | {r['fused_ms']:.2f} ms | {r['graph_ms']:.2f} ms "
                     f"| {r['reference_ms'] / r['graph_ms']:.1f}x | {r['batch'] / r['graph_ms'] * 1e3:.0f} |")
    copy = results["copy_gbs"]
    lines += ["", f"Attention decode, one 7B layer (H=4, dz=256, dv=2048), full chunk C=2048, bf16 KV; "
                  f"device-to-device copy: {copy:.0f} GB/s (read + write)", "",
              "| batch | K/V read | kernel time | achieved | of copy bandwidth |", "|---|---|---|---|---|"]
    for r in results["attention"]:
        lines.append(f"| {r['batch']} | {r['mbytes']:.0f} MB | {r['ms']:.3f} ms | {r['gbs']:.0f} GB/s "
                     f"| {100 * r['gbs'] / copy:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--fill", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()

    start = time.perf_counter()
    load_cuda_extension()
    model = build_model(args.layers)
    results = dict(layers=args.layers, fill=args.fill, device=torch.cuda.get_device_name(), torch=torch.__version__,
                   decode=[], attention=[])
    for batch in args.batches:
        results["decode"].append(decode_timings(model, batch, args.fill, args.iters))
        print(json.dumps(results["decode"][-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
    del model
    torch.cuda.empty_cache()
    results["copy_gbs"] = copy_bandwidth_gbs()
    for batch in args.batches:
        results["attention"].append(attention_bandwidth(batch, args.iters))
        print(json.dumps(results["attention"][-1]), flush=True)
    table = tables(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    (args.out / "gpu_bench.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
