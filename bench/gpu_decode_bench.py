"""GPU decode benchmark for the official 7B shape (run by scripts/gpu_check.sh on one H200).

Usage: python bench/gpu_decode_bench.py --out DIR [--device cuda|cpu] [--tiny] [--layers 4]
           [--batches 1 16 64 256] [--fill 1024] [--iters 10] [--time-budget SECONDS]

Model: the mega7.1B shape (D=4096, 4 heads, Z=1024, E=8192, F=11264, N=16, G=64, C=2048, vocab 32000)
with `--layers` of its 32 blocks plus the embedding and LM head, random weights drawn on the device by
the official init scheme, bf16 weights and K/V (fp32 for the reference of section 5). `--tiny` swaps in
a small shape so the whole benchmark runs on a CPU in seconds (`--device cpu --tiny`: the plumbing
check of scripts/gpu_check.sh's dry run; its numbers say nothing about a GPU).

Sections, each timed with CUDA events (perf_counter on a CPU), median of `--iters` after warm-up:
1. copy: device-to-device copy bandwidth, bytes read + written / time (the ceiling used below).
2. decode: one `Megalodon.decode_step` at each batch size, every slot at position `--fill` with random
   state: reference eager (the torch twins), fused eager, fused + CUDA graph (`DecodeGraphRunner`, GPU
   only). Bytes moved per step = linear weights of the layers (+ biases) + the LM head + one embedding
   row per row + per slot the CEMA state and norm statistics read and written and the K/V of the
   current chunk read up to its fill plus the new entry written; achieved GB/s of the fastest fused
   path, and its fraction of the copy bandwidth.
3. attention: the fused attention-decode op of one layer at a full chunk (fill C - 1), K/V bytes read
   (and the new entry written) / kernel time, L2 flushed before each call, against the copy bandwidth.
4. prefill: a prompt of `--prefill-chunks` whole chunks (16 x 2048 = 32K tokens) through
   `ModelRunner.prefill`, one segment per chunk; tokens/s.
5. accuracy: the same weights in fp32 with the reference kernels decode `--decode-tokens` greedy tokens
   after a short prompt; the bf16 model (fused, CUDA graphs on a GPU) is fed the same tokens (teacher
   forcing). Max abs error and relative L2 error of its logits, and greedy agreement (its argmax equals
   the fp32 token).

Writes gpu_bench.json (after every section, so a run stopped at its time limit keeps what it measured),
gpu_bench.md and, where matplotlib is installed, gpu_bench.png into --out; prints the markdown last.
Exits 1 if a section failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalodon_infer import ModelConfig  # noqa: E402
from megalodon_infer.kernels import decode, load_cpu_extension, load_cuda_extension  # noqa: E402
from megalodon_infer.model.megalodon import Megalodon  # noqa: E402
from megalodon_infer.model.state import MegalodonState, allocate_state  # noqa: E402
from megalodon_infer.worker.cuda_graphs import DecodeGraphRunner  # noqa: E402
from megalodon_infer.worker.decode_ops import build_decode_ops  # noqa: E402
from megalodon_infer.worker.model_runner import ModelRunner  # noqa: E402

SHAPE_7B = dict(num_layers=32, model_dim=4096, z_dim=1024, value_dim=8192, num_heads=4, ffn_hidden_dim=11264,
                cema_ndim=16, norm_num_groups=64, vocab_size=32000, chunk_size=2048)
SHAPE_TINY = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=8,
                  norm_num_groups=4, vocab_size=512, chunk_size=32)
KV_DTYPE = torch.bfloat16
# the goals this benchmark is held to (docs/benchmarks.md); evaluated on a GPU with the 7B shape only
GOAL_SPEEDUP_B1 = 3.0
GOAL_ATTENTION_FRACTION = 0.70
GOAL_DECODE_FRACTION_B64 = 0.70


# ------------------------------------------------------------------------------------------ timing
class Clock:
    """Milliseconds of device work: CUDA events on a GPU, perf_counter after a sync elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
        if before is not None:
            before()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start_s = time.perf_counter()
        fn()
        return (time.perf_counter() - start_s) * 1e3

    def median_ms(self, fn: Callable[[], object], iters: int, warmup: int = 2,
                  before: Callable[[], object] | None = None) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        return statistics.median(self.time_ms(fn, before) for _ in range(iters))


# ------------------------------------------------------------------------------------ model, state
@torch.no_grad()
def init_official_(model: Megalodon, seed: int) -> Megalodon:
    """The official init scheme (as `model.init.init_weights`), drawn on the model's device: projections
    N(0, 1/sqrt(3 fan_in)) with zero biases, embedding and head truncated N(0, 1/sqrt(D)), CEMA alpha and
    delta N(0, 0.2), theta the logit of exp(-k ln D / D) permuted, gamma N(0, 1) real, omega truncated
    N(0, 0.25); norm offsets zero."""
    cfg, device = model.config, model.device
    g = torch.Generator(device).manual_seed(seed)
    D = cfg.model_dim

    def normal_(t: torch.Tensor, std: float, bound: float | None = None) -> None:
        t.normal_(0.0, std, generator=g)
        if bound is not None:
            t.clamp_(-bound, bound)

    normal_(model.embed.weight, D**-0.5, 3 * D**-0.5)
    head = model.output.output
    if not cfg.share_emb:
        normal_(head.weight, D**-0.5, 3 * D**-0.5)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            normal_(module.weight, (3.0 * module.in_features) ** -0.5)
            if module.bias is not None:
                module.bias.zero_()
    perm_gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        cema = layer.mega.cema
        normal_(cema.alpha, 0.2)
        normal_(cema.delta, 0.2)
        freqs = torch.exp(-torch.arange(1, D + 1, dtype=torch.float64) * math.log(D) / D).clamp(1e-6, 1 - 1e-6)
        cema.theta.copy_(torch.logit(freqs[torch.randperm(D, generator=perm_gen)]).float().view(D, 1, 1))
        normal_(cema.gamma, 1.0)
        cema.gamma[..., 1] = 0.0
        normal_(cema.omega, 0.25, 1.0)
    return model


def build_models(cfg: ModelConfig, device: torch.device, seed: int = 0) -> tuple[Megalodon, Megalodon]:
    """(fp32, bf16) models with the same random weights on `device`."""
    with torch.device(device):
        model = Megalodon(cfg)
    init_official_(model, seed)
    bf16 = copy.deepcopy(model).prepare_for_inference(torch.bfloat16, device)
    return model.prepare_for_inference(torch.float32, device), bf16


def random_state(model: Megalodon, slots: int, fill: int, seed: int = 1) -> MegalodonState:
    """Every slot at position `fill` with random statistics, CEMA state and K/V."""
    device = model.device
    g = torch.Generator(device).manual_seed(seed)
    state = allocate_state(model.config, slots, KV_DTYPE, torch.float32, device)
    state.position.fill_(fill)
    state.norm_mean.normal_(0.0, 0.1, generator=g)
    state.norm_var.uniform_(0.5, 1.5, generator=g)
    torch.view_as_real(state.cema_h).normal_(0.0, 0.1, generator=g)
    state.keys.normal_(generator=g)
    state.values.normal_(generator=g)
    return state


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: Megalodon) -> int:
    """Linear weights and biases of every layer, plus the LM head (read once per decode step)."""
    layers = sum(tensor_bytes(p) for layer in model.layers for m in layer.modules() if isinstance(m, nn.Linear)
                 for p in m.parameters())
    return layers + tensor_bytes(model.output.output.weight)


def state_bytes_per_slot(cfg: ModelConfig, fill: int) -> int:
    """One slot's state traffic in one decode step (module docstring, section 2)."""
    L, D, N, G = cfg.num_layers, cfg.model_dim, cfg.cema_ndim, cfg.norm_num_groups
    kv_entry = (cfg.z_dim + cfg.value_dim) * torch.empty((), dtype=KV_DTYPE).element_size()
    cema = 2 * L * D * N * 8  # complex64, read and written
    norms = 2 * 2 * (L + 1) * G * 4  # mean and var, read and written
    kv = L * (fill * kv_entry + kv_entry)  # the chunk so far read, the new entry written
    return cema + norms + kv + 16


def decode_bytes(model: Megalodon, batch: int, fill: int) -> int:
    embed_row = model.config.model_dim * model.embed.weight.element_size()
    return weight_bytes(model) + batch * (embed_row + state_bytes_per_slot(model.config, fill))


# --------------------------------------------------------------------------------------- sections
def copy_section(ctx: Context) -> dict:
    nbytes = (4 << 30) if ctx.cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = ctx.clock.median_ms(lambda: dst.copy_(src), iters=ctx.args.iters)
    return dict(bytes=2 * nbytes, ms=ms, gbs=2 * nbytes / (ms * 1e-3) / 1e9)


def decode_section(ctx: Context) -> list[dict]:
    ops = {mode: build_decode_ops(ctx.bf16, KV_DTYPE, mode) for mode in ("reference", "fused")}
    assert ops["fused"].is_fused, ops["fused"].kernels.reason
    rows = []
    for batch in ctx.args.batches:
        if ctx.out_of_time(f"decode batch {batch}"):
            break
        rows.append(decode_row(ctx, ops, batch))
        ctx.progress("decode", rows[-1])
    return rows


def decode_row(ctx: Context, ops: dict, batch: int) -> dict:
    model, args, clock = ctx.bf16, ctx.args, ctx.clock
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=ctx.device)
    slot_ids = torch.arange(batch, device=ctx.device)
    row: dict = dict(batch=batch)
    for mode, mode_ops in ops.items():
        state = random_state(model, batch, args.fill)
        row[f"{mode}_ms"] = clock.median_ms(lambda s=state, o=mode_ops: model.decode_step(tokens, s, slot_ids, o),
                                            args.iters)
        del state
        if ctx.cuda:
            torch.cuda.empty_cache()  # batch 256's state is ~39 GB: give it back before the next one
    row["graph_ms"] = None
    if ctx.cuda:
        state = random_state(model, batch + 1, args.fill)  # one extra slot for graph padding
        runner = DecodeGraphRunner(model, state, pad_slot=batch, ops=ops["fused"], buckets=(batch,))
        runner.capture()
        if runner.captured_buckets != (batch,):
            raise RuntimeError(f"CUDA graph capture failed at batch {batch} (see the log above)")
        row["graph_ms"] = clock.median_ms(lambda: runner.step(tokens, slot_ids), args.iters)
        del runner, state
        torch.cuda.empty_cache()
    best = row["graph_ms"] if row["graph_ms"] is not None else row["fused_ms"]
    # slots start at --fill and advance one position per call: count the mean fill of the timed calls
    row["bytes"] = decode_bytes(model, batch, args.fill + 2 + args.iters // 2)
    row["best_ms"] = best
    row["speedup"] = row["reference_ms"] / best
    row["tokens_per_s"] = batch / best * 1e3
    row["gbs"] = row["bytes"] / (best * 1e-3) / 1e9
    row["copy_fraction"] = row["gbs"] / ctx.copy_gbs if ctx.copy_gbs else None
    return row


def attention_section(ctx: Context) -> list[dict]:
    flush = torch.empty((256 << 20) if ctx.cuda else (1 << 20), dtype=torch.uint8, device=ctx.device)  # > L2
    rows = []
    for batch in ctx.args.batches:
        if ctx.out_of_time(f"attention batch {batch}"):
            break
        rows.append(attention_row(ctx, batch, flush))
        ctx.progress("attention", rows[-1])
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows


def attention_row(ctx: Context, batch: int, flush: torch.Tensor) -> dict:
    cfg, device = ctx.cfg, ctx.device
    C, H, dz, dv = cfg.chunk_size, cfg.num_heads, cfg.head_z_dim, cfg.head_value_dim
    g = torch.Generator(device).manual_seed(batch)
    keys = torch.empty(batch, C, H, dz, dtype=KV_DTYPE, device=device).normal_(generator=g)
    values = torch.empty(batch, C, H, dv, dtype=KV_DTYPE, device=device).normal_(generator=g)
    position = torch.full((batch,), C - 1, dtype=torch.long, device=device)  # a full chunk after this key
    slot_ids = torch.arange(batch, device=device)
    q = torch.randn(batch, H, dz, device=device, generator=g) / dz**0.5
    k_new = torch.randn(batch, H, dz, device=device, generator=g).to(KV_DTYPE)
    v_new = torch.randn(batch, H, dv, device=device, generator=g).to(KV_DTYPE)
    ms = ctx.clock.median_ms(lambda: decode.attention_decode(q, k_new, v_new, keys, values, slot_ids, position),
                             ctx.args.iters, before=flush.zero_)
    nbytes = batch * C * H * (dz + dv) * keys.element_size()  # C - 1 entries read, one written
    row = dict(batch=batch, bytes=nbytes, ms=ms, gbs=nbytes / (ms * 1e-3) / 1e9)
    row["copy_fraction"] = row["gbs"] / ctx.copy_gbs if ctx.copy_gbs else None
    return row


def prefill_section(ctx: Context) -> dict:
    model, cfg, clock = ctx.bf16, ctx.cfg, ctx.clock
    C, chunks = cfg.chunk_size, ctx.args.prefill_chunks
    runner = ModelRunner(model, model.allocate_state(2), kernels="fused")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (chunks * C,), generator=g).tolist()
    runner.prefill(1, prompt[:C], all_logits=False)  # warm-up, on another slot
    clock.sync()
    per_chunk = []
    start = time.perf_counter()
    for i in range(chunks):  # one segment per chunk: a segment never crosses a chunk boundary
        per_chunk.append(clock.time_ms(lambda i=i: runner.prefill(0, prompt[i * C:(i + 1) * C], all_logits=False)))
    clock.sync()
    seconds = time.perf_counter() - start
    assert int(runner.state.position[0]) == chunks * C
    return dict(tokens=chunks * C, chunks=chunks, seconds=seconds, tokens_per_s=chunks * C / seconds,
                chunk_ms_median=statistics.median(per_chunk))


def accuracy_section(ctx: Context) -> dict:
    """fp32 reference greedy decode; bf16 fused (+ graphs) teacher-forced with its tokens."""
    fp32, bf16, cfg = ctx.fp32, ctx.bf16, ctx.cfg
    steps = ctx.args.decode_tokens
    prompt = torch.randint(0, cfg.vocab_size, (min(32, cfg.chunk_size),), generator=torch.Generator().manual_seed(7))
    prompt = prompt.tolist()
    ref = ModelRunner(fp32, fp32.allocate_state(1), kernels="reference")
    logits = ref.prefill(0, prompt, all_logits=False)[-1]
    ref_logits, tokens = [], []
    for _ in range(steps):
        ref_logits.append(logits)
        tokens.append(int(logits.argmax()))
        logits = ref.decode([0], [tokens[-1]])[0]
    ref_all = torch.stack(ref_logits)  # [T, V]
    del ref
    # the serving path: bf16, fused kernels, decode replayed from CUDA graphs on a GPU (pad slot 1)
    runner = ModelRunner(bf16, bf16.allocate_state(2), pad_slot=1, use_cuda_graphs=ctx.cuda, kernels="fused")
    assert runner.decode_backend == "fused"
    logits = runner.prefill(0, prompt, all_logits=False)[-1]
    got = []
    for token in tokens:
        got.append(logits.float())
        logits = runner.decode([0], [token])[0]
    got_all = torch.stack(got)
    diff = (got_all - ref_all).abs()
    agree = got_all.argmax(-1).cpu() == torch.tensor(tokens)
    disagreements = (~agree).nonzero().flatten().tolist()
    return dict(tokens=steps, prompt_tokens=len(prompt), max_abs_error=float(diff.max()),
                ref_max_abs_logit=float(ref_all.abs().max()),
                rel_l2_error=float(torch.linalg.vector_norm(got_all - ref_all) / torch.linalg.vector_norm(ref_all)),
                greedy_agreement=float(agree.float().mean()),
                first_disagreement=disagreements[0] if disagreements else None,
                cuda_graphs=runner.graphs is not None and bool(runner.graphs.captured_buckets))


# ---------------------------------------------------------------------------------------- driver
class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.clock = Clock(self.device)
        shape = dict(SHAPE_TINY if args.tiny else SHAPE_7B, num_layers=args.layers)
        self.cfg = ModelConfig(**shape)
        self.start = time.perf_counter()
        self.deadline = self.start + args.time_budget if args.time_budget > 0 else math.inf
        self.copy_gbs: float | None = None
        self.fp32: Megalodon | None = None
        self.bf16: Megalodon | None = None
        name = torch.cuda.get_device_name(self.device) if self.cuda else "CPU"
        self.results: dict = dict(
            date=date.today().isoformat(), device=name, torch=torch.__version__, shape="tiny" if args.tiny else "7B",
            config=shape, layers=args.layers, fill=args.fill, iters=args.iters, batches=args.batches,
            kv_dtype="bfloat16", sections={}, errors={}, skipped=[])

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self, what: str) -> bool:
        if time.perf_counter() < self.deadline:
            return False
        self.results["skipped"].append(f"{what}: over the {self.args.time_budget:.0f} s time budget")
        print(f"SKIP {what}: over the time budget", flush=True)
        return True

    def progress(self, section: str, row: dict) -> None:
        print(f"[{self.elapsed():5.0f} s] {section}: {json.dumps(row)}", flush=True)

    def write(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.results["seconds"] = round(self.elapsed(), 1)
        self.results["goals"] = goals(self.results, self.cuda and not self.args.tiny)
        (self.args.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def run(self, name: str, fn: Callable[[Context], object]) -> None:
        if self.out_of_time(name):
            return
        t0 = time.perf_counter()
        try:
            self.results["sections"][name] = fn(self)
            print(f"[{self.elapsed():5.0f} s] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - the other sections still run; the exit status says it failed
            traceback.print_exc()
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
            self.write()


def goals(results: dict, applies: bool) -> list[dict]:
    """The goals of docs/benchmarks.md, each with what was measured (GPU + 7B shape only)."""
    sections = results["sections"]
    decode_rows = {r["batch"]: r for r in sections.get("decode", [])}
    attention_rows = {r["batch"]: r for r in sections.get("attention", [])}

    def row(goal: str, target: str, value: float | None, ok: bool | None, shown: str) -> dict:
        status = "n/a" if not applies else ("not measured" if value is None else ("pass" if ok else "FAIL"))
        measured = shown if applies and value is not None else "-"  # a CPU or tiny run measures no goal
        return dict(goal=goal, target=target, measured=measured, status=status)

    b1 = decode_rows.get(1, {})
    speedup = b1["reference_ms"] / b1["graph_ms"] if b1.get("graph_ms") else None
    att_batch = 64 if 64 in attention_rows else max(attention_rows, default=None)
    att = attention_rows.get(att_batch, {}).get("copy_fraction")
    dec = decode_rows.get(64, {}).get("copy_fraction")
    return [
        row("decode, batch 1: fused + CUDA graph vs reference eager", f">= {GOAL_SPEEDUP_B1:.0f}x", speedup,
            speedup is not None and speedup >= GOAL_SPEEDUP_B1, f"{speedup:.2f}x" if speedup else ""),
        row(f"attention decode (batch {att_batch}, full chunk): of copy bandwidth",
            f">= {GOAL_ATTENTION_FRACTION:.0%}", att, att is not None and att >= GOAL_ATTENTION_FRACTION,
            f"{att:.0%}" if att is not None else ""),
        row("decode, batch 64: bytes moved per step / time, of copy bandwidth", f">= {GOAL_DECODE_FRACTION_B64:.0%}",
            dec, dec is not None and dec >= GOAL_DECODE_FRACTION_B64, f"{dec:.0%}" if dec is not None else ""),
    ]


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def fmt_gbs(x: float) -> str:
    return f"{x:.0f} GB/s" if x >= 100 else f"{x:.3g} GB/s"


def fmt_frac(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(results: dict) -> str:
    s, cfg = results["sections"], results["config"]
    shape = "mega7.1B" if results["shape"] == "7B" else "tiny (CPU plumbing check: not a performance number)"
    copy_row = s.get("copy")
    copy_text = f"{fmt_gbs(copy_row['gbs'])} (read + write)" if copy_row else "not measured"
    lines = [f"## Decode benchmark: {results['device']}, torch {results['torch']}, {results['date']}", "",
             f"Shape {shape}: {results['layers']} of its layers (D={cfg['model_dim']}, Z={cfg['z_dim']}, "
             f"E={cfg['value_dim']}, H={cfg['num_heads']}, F={cfg['ffn_hidden_dim']}, C={cfg['chunk_size']}, "
             f"V={cfg['vocab_size']}) + embedding and LM head; random weights (official init), bf16 weights and K/V; "
             f"slots at fill {results['fill']}; median of {results['iters']}. Device-to-device copy: {copy_text}.", ""]
    if s.get("decode"):
        lines += ["| batch | reference eager | fused eager | fused + CUDA graph | best vs reference | tokens/s "
                  "| bytes / step | achieved | of copy |", "|---|---|---|---|---|---|---|---|---|"]
        for r in s["decode"]:
            lines.append(f"| {r['batch']} | {fmt_ms(r['reference_ms'])} | {fmt_ms(r['fused_ms'])} "
                         f"| {fmt_ms(r['graph_ms'])} | {r['speedup']:.2f}x | {r['tokens_per_s']:.0f} "
                         f"| {fmt_bytes(r['bytes'])} | {fmt_gbs(r['gbs'])} | {fmt_frac(r['copy_fraction'])} |")
        lines.append("")
    if s.get("attention"):
        fill = cfg["chunk_size"] - 1
        lines += [f"Attention decode, one layer, full chunk (fill {fill}), L2 flushed before each call:",
                  "", "| batch | K/V bytes | kernel time | achieved | of copy |", "|---|---|---|---|---|"]
        for r in s["attention"]:
            lines.append(f"| {r['batch']} | {fmt_bytes(r['bytes'])} | {fmt_ms(r['ms'])} | {fmt_gbs(r['gbs'])} "
                         f"| {fmt_frac(r['copy_fraction'])} |")
        lines.append("")
    if s.get("prefill"):
        p = s["prefill"]
        lines += ["| prefill prompt | segments | time | tokens/s | median segment |", "|---|---|---|---|---|",
                  f"| {p['tokens']} tokens | {p['chunks']} x {cfg['chunk_size']} | {p['seconds']:.2f} s "
                  f"| {p['tokens_per_s']:.0f} | {fmt_ms(p['chunk_ms_median'])} |", ""]
    if s.get("accuracy"):
        a = s["accuracy"]
        first = "none" if a["first_disagreement"] is None else f"token {a['first_disagreement']}"
        lines += ["bf16 (fused" + (" + CUDA graphs" if a["cuda_graphs"] else "") + ") vs fp32 reference logits, "
                  f"teacher-forced over the fp32 run's {a['tokens']} greedy tokens:", "",
                  "| tokens | max abs error | max abs fp32 logit | relative L2 error | greedy agreement "
                  "| first disagreement |", "|---|---|---|---|---|---|",
                  f"| {a['tokens']} | {a['max_abs_error']:.4f} | {a['ref_max_abs_logit']:.2f} "
                  f"| {a['rel_l2_error']:.2e} | {a['greedy_agreement']:.1%} | {first} |", ""]
    lines += ["| goal | target | measured | status |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | {g['status']} |" for g in results["goals"]]
    for name, error in results["errors"].items():
        lines.append(f"\nFAILED section {name}: {error}")
    for skipped in results["skipped"]:
        lines.append(f"\nSKIPPED {skipped}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"NOTE: matplotlib is not installed; no plot written to {path}")
        return
    rows = results["sections"].get("decode") or []
    if not rows:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    for i, (key, label) in enumerate((("reference_ms", "reference eager"), ("fused_ms", "fused eager"),
                                      ("graph_ms", "fused + CUDA graph"))):
        if all(r[key] is not None for r in rows):
            ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] for r in rows], width=0.27, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("decode step (ms)")
    ax.legend(fontsize=8)
    fractions = [r["copy_fraction"] or 0.0 for r in rows]
    bx.bar(list(x), fractions, color="tab:green")
    bx.axhline(GOAL_DECODE_FRACTION_B64, color="gray", linestyle="--", linewidth=1)
    bx.set_xticks(list(x), [f"batch {r['batch']}" for r in rows])
    bx.set_ylabel("bytes moved / time, of copy bandwidth")
    fig.suptitle(f"{results['device']}: {results['shape']} shape, {results['layers']} layers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small shape (seconds on a CPU): the plumbing check")
    parser.add_argument("--layers", type=int, default=None, help="blocks of the shape to run (default 4; tiny 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 16 64 256 (tiny: 1 4)")
    parser.add_argument("--fill", type=int, default=None, help="every slot's position (default C / 2)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--prefill-chunks", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (--device cpu)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds; sections and batch sizes not started by then are skipped (0: no limit)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    shape = SHAPE_TINY if args.tiny else SHAPE_7B
    args.layers = args.layers or (SHAPE_TINY["num_layers"] if args.tiny else 4)
    args.batches = args.batches or ([1, 4] if args.tiny else [1, 16, 64, 256])
    args.fill = shape["chunk_size"] // 2 if args.fill is None else args.fill
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    ctx = Context(args)
    print(f"device {ctx.results['device']}, torch {torch.__version__}, shape {ctx.results['shape']}, "
          f"{args.layers} layers, batches {args.batches}", flush=True)
    (load_cuda_extension if ctx.cuda else load_cpu_extension)()
    ctx.fp32, ctx.bf16 = build_models(ctx.cfg, ctx.device)
    print(f"[{ctx.elapsed():5.0f} s] models built: {ctx.bf16.num_parameters() / 1e9:.2f} B parameters", flush=True)
    ctx.run("copy", copy_section)
    ctx.copy_gbs = (ctx.results["sections"].get("copy") or {}).get("gbs")
    ctx.run("decode", decode_section)
    ctx.run("attention", attention_section)
    ctx.run("prefill", prefill_section)
    ctx.run("accuracy", accuracy_section)
    table = markdown(ctx.results)
    (args.out / "gpu_bench.md").write_text(table + "\n")
    plot(ctx.results, args.out / "gpu_bench.png")
    print(f"\ntotal {ctx.elapsed():.0f} s\n\n{table}")
    return 1 if ctx.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
