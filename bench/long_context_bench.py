"""Unlimited context, measured: a conversation to 1M tokens, long chats over HTTP, busy neighbours.

    python bench/long_context_bench.py            # the bundled demo model, default flags (~20 min, 2 cores)
    python bench/long_context_bench.py --quick    # smaller sizes (a few minutes)

1. Engine, one conversation grown to 1,000,000 tokens: requests whose prompts extend the previous
   one (1K, 64K, 256K, 1M tokens) on one engine with default settings, so each prefills only what
   is new (the prefix cache resumes the rest); prefill tokens/s per 64K-token window, the request's
   state bytes, the process's RSS, and decode ms/token at each context against a 1K-token context
   measured alongside (decode-only requests from the cached prompt-end states, alternating, so the
   ratio holds however this shared machine's speed drifts over the run).
2. HTTP, time between streamed tokens at 1K, 40K and 256K tokens of context, on a server started
   with no flags (`megalodon-serve --host --port` only), prompts as token ids: each prompt once,
   then interleaved rounds of all three (whole-prompt cache hits, decode only), medians.
3. HTTP, a long chat with default flags: turns of ~8K new tokens of real text, time to first token
   per turn; beside it the same chat on a LLaMA-style transformer of equal size (in process, its KV
   cache kept across turns, the best case for it) until its KV exceeds --kv-budget-gb.
4. A busy neighbour: a bounded CPU-burning process beside the server; decode tokens/s and the time
   to first token of a 2,048-token prompt with the default thread policy, one thread, and one
   thread per usable CPU, each with the neighbour off and on.

Every comparison is measured in the same run. Tables print and go to bench/out/long_context.md,
numbers to long_context.json, plots to long_context.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import BaselineDecoder, matched_baseline  # noqa: E402
from serve_process import Server  # noqa: E402

from megalodon_infer import EngineConfig, LLMEngine, SamplingParams, load_model, request_state_bytes  # noqa: E402
from megalodon_infer.config import DEMO_MODEL_DIR  # noqa: E402
from megalodon_infer.tokenization.tokenizer import Tokenizer  # noqa: E402
from megalodon_infer.worker.resources import default_torch_threads, usable_cpus  # noqa: E402

WINDOW = 65536


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------- 1. engine to 1M
def run_request(engine: LLMEngine, request_id: str, prompt: list[int], decode_tokens: int,
                windows: dict[int, list[float]] | None = None) -> tuple[list[float], int]:
    """One request to its end: (seconds of each one-token decode step, cached tokens). Prefill steps
    add (tokens, seconds) to `windows`, keyed by the WINDOW-token window they started in."""
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.8, seed=0, max_tokens=decode_tokens,
                                                          ignore_eos=True))
    request = engine.requests[request_id]
    decode_steps, cached = [], 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - t0
        stats = engine.last_stats
        if stats.num_prompt_tokens and windows is not None:
            start_pos = request.num_computed_tokens - stats.num_prompt_tokens
            window = windows.setdefault(start_pos // WINDOW * WINDOW, [0, 0.0])
            window[0] += stats.num_prompt_tokens
            window[1] += seconds
        elif stats.num_generation_tokens == 1:
            decode_steps.append(seconds)
        for out in outputs:
            cached = out.num_cached_tokens
    return decode_steps[4:] or decode_steps, cached


def grow_conversation(stages: list[int], decode_tokens: int, rounds: int) -> dict:
    """Part 1. Each stage's request extends the previous prompt (prefilling only what is new); then,
    while its prompt-end state is fresh in the cache, `rounds` decode-only requests at this context
    alternate with decode-only requests at the first stage's context (a 1K prompt, also a whole-prompt
    hit), so each stage's ratio to 1K is measured side by side, whatever the machine's drift."""
    engine = LLMEngine.from_config(EngineConfig(max_num_seqs=2))
    cfg = engine.model.config
    tokens = random_ids(stages[-1], engine.tokenizer.vocab_size, seed=1)
    short = random_ids(stages[0], engine.tokenizer.vocab_size, seed=3)
    windows: dict[int, list[float]] = {}  # window start -> [tokens, seconds]
    rows = []
    for n in stages:
        _, cached = run_request(engine, f"ctx{n}", tokens[:n], decode_tokens, windows)
        long_steps, short_steps = [], []
        for r in range(rounds):
            for which in (("long", "short") if r % 2 == 0 else ("short", "long")):
                prompt, steps = (tokens[:n], long_steps) if which == "long" else (short, short_steps)
                steps += run_request(engine, f"ctx{n}-{which}{r}", prompt, decode_tokens)[0]
        decode, alongside = statistics.median(long_steps), statistics.median(short_steps)
        fill = n % cfg.chunk_size
        rows.append({"context": n, "cached_tokens": cached, "decode_ms": decode * 1e3,
                     "decode_1k_ms": alongside * 1e3, "vs_1k": decode / alongside,
                     "state_bytes": request_state_bytes(cfg, engine.model.dtype, engine.model.stat_dtype, num_kv=fill),
                     "rss_bytes": rss_bytes(), "prefix_cache_bytes": engine.prefix_cache.stored_bytes()})
        print(f"  engine: context {n:,}: decode {decode * 1e3:.2f} ms/token (1K alongside {alongside * 1e3:.2f}), "
              f"cached {cached:,}", flush=True)
    prefill = [{"window_start": start, "tokens": t, "tokens_per_s": t / s} for start, (t, s) in sorted(windows.items())]
    return {"stages": rows, "prefill_windows": prefill}


# ----------------------------------------------------------------------------- HTTP streaming
def stream_completion(url: str, prompt, max_tokens: int, timeout: float = 3600) -> dict:
    """One streamed completion: time to first token and ms per token after it (from the running
    usage each chunk carries, so merged deltas count right)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    start = time.perf_counter()
    marks = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk.get("usage"):
                marks.append((time.perf_counter(), chunk["usage"]["completion_tokens"],
                              chunk["usage"].get("prompt_tokens_details") or {}))
    (t_first, n_first, _), (t_last, n_last, details) = marks[0], marks[-1]
    return {"ttft_s": t_first - start, "ms_per_token": (t_last - t_first) / max(1, n_last - n_first) * 1e3,
            "cached_tokens": details.get("cached_tokens", 0)}


def http_itl(contexts: list[int], out_dir: Path, rounds: int) -> list[dict]:
    """Part 2. Each context's prompt is sent once (prefilled, its end state cached), then `rounds`
    rounds stream every context again in turn (whole-prompt hits: decode only); medians per context."""
    with Server([], out_dir / "long_context_server_itl.log") as server:
        vocab = httpx.get(server.url + "/tokenizer_info").json()["vocab_size"]
        tokens = random_ids(contexts[-1], vocab, seed=2)
        first = {n: stream_completion(server.url, tokens[:n], max_tokens=8) for n in contexts}
        samples: dict[int, list[dict]] = {n: [] for n in contexts}
        for r in range(rounds):
            for n in (contexts if r % 2 == 0 else contexts[::-1]):
                samples[n].append(stream_completion(server.url, tokens[:n], max_tokens=128))
    rows = []
    for n in contexts:
        itl = statistics.median(s["ms_per_token"] for s in samples[n])
        rows.append({"context": n, "ms_per_token": itl, "first_ttft_s": first[n]["ttft_s"],
                     "cached_tokens": min(s["cached_tokens"] for s in samples[n])})
        print(f"  http: context {n:,}: {itl:.2f} ms between tokens", flush=True)
    for row in rows:
        row["vs_1k"] = row["ms_per_token"] / rows[0]["ms_per_token"]
    return rows


# ------------------------------------------------------------------------------ 3. long chat
def text_turns(tokenizer: Tokenizer, turn_tokens: int, num_turns: int) -> list[str]:
    """Consecutive pieces of CPython's standard library, ~turn_tokens tokens each."""
    pieces, current, count = [], [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            current.append(line)
            count += len(line) // 3 + 1
            if count >= turn_tokens:
                pieces.append("".join(current))
                current, count = [], 0
                if len(pieces) == num_turns:
                    return pieces
    return pieces


class KVBaseline:
    """The transformer baseline serving one chat: its KV cache grows with every turn and is kept."""

    def __init__(self, model: BaselineDecoder, budget_bytes: float) -> None:
        self.model, self.budget = model, budget_bytes
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def bytes_after(self, new_tokens: int) -> int:
        m = self.model
        return 2 * len(m.blocks) * m.heads * m.head_dim * (self.length + new_tokens) * 4

    @torch.inference_mode()
    def prefill(self, tokens: list[int], block: int = 2048) -> float:
        """Seconds to prefill `tokens` after the cached context (what its time to first token is)."""
        start = time.perf_counter()
        m = self.model
        for offset in range(0, len(tokens), block):
            ids = torch.tensor([tokens[offset:offset + block]])
            x = m.embed(ids)
            T = ids.shape[1]
            for i, blk in enumerate(m.blocks):
                q, k, v = blk["qkv"](blk["norm1"](x)).view(1, T, 3, m.heads, m.head_dim).unbind(2)
                k, v = k.transpose(1, 2), v.transpose(1, 2)
                if i == len(self.keys):
                    self.keys.append(k)
                    self.values.append(v)
                else:
                    self.keys[i] = torch.cat([self.keys[i], k], dim=2)
                    self.values[i] = torch.cat([self.values[i], v], dim=2)
                total = self.keys[i].shape[2]
                mask = torch.ones(T, total, dtype=torch.bool).tril(diagonal=total - T)
                att = F.scaled_dot_product_attention(q.transpose(1, 2), self.keys[i], self.values[i], attn_mask=mask)
                x = x + blk["out"](att.transpose(1, 2).reshape(1, T, -1))
                gate, up = blk["gate_up"](blk["norm2"](x)).chunk(2, dim=-1)
                x = x + blk["down"](F.silu(gate) * up)
            m.head(m.norm(x[:, -1:]))
            self.length += T
        return time.perf_counter() - start


def chat_turn(url: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, ttft, text, cached = time.perf_counter(), None, [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = choice["delta"].get("content")
                if content and ttft is None:
                    ttft = time.perf_counter() - start
                text.append(content or "")
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ttft if ttft is not None else time.perf_counter() - start, "".join(text), cached


def long_chat(turn_tokens: int, num_turns: int, kv_budget_gb: float, out_dir: Path) -> list[dict]:
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR)
    turns = text_turns(tokenizer, turn_tokens, num_turns)
    model = load_model(DEMO_MODEL_DIR)
    baseline = KVBaseline(matched_baseline(model.config, model.num_parameters()), kv_budget_gb * 2**30)
    del model
    rows, messages = [], []
    with Server([], out_dir / "long_context_server_chat.log") as server:
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            ttft, reply, cached = chat_turn(server.url, messages, max_tokens=16)
            messages.append({"role": "assistant", "content": reply})
            context = len(tokenizer.encode_chat(messages, add_generation_prompt=False))
            new_tokens = tokenizer.encode(text, add_bos=False)
            base_ttft = None
            if baseline.bytes_after(len(new_tokens)) <= baseline.budget:
                base_ttft = baseline.prefill(new_tokens)
            rows.append({"turn": i + 1, "context_tokens": context, "ttft_s": ttft, "cached_tokens": cached,
                         "baseline_ttft_s": base_ttft, "baseline_kv_bytes": baseline.bytes_after(0)})
            shown = f"{base_ttft:.2f} s" if base_ttft is not None else "over its KV budget"
            print(f"  chat turn {i + 1}: context {context:,}, TTFT {ttft:.2f} s (cached {cached:,}); "
                  f"transformer {shown}", flush=True)
    return rows


# --------------------------------------------------------------------------- 4. busy neighbour
def busy_neighbour(decode_tokens: int, prompt_tokens: int, out_dir: Path, repeats: int) -> list[dict]:
    variants = [("default", None), ("one thread", 1), ("all CPUs", usable_cpus())]
    rows = []
    vocab = Tokenizer.from_dir(DEMO_MODEL_DIR).vocab_size
    for name, threads in variants:
        args = [] if threads is None else ["--torch-threads", str(threads)]
        with Server(args, out_dir / f"long_context_server_threads_{threads}.log") as server:
            result = {"variant": name, "threads": threads or default_torch_threads()}
            for busy in (False, True):
                speeds, prefills = [], []
                for repeat in range(repeats):  # alternating idle/busy rounds would mix them: keep each together
                    neighbour = None
                    if busy:  # one CPU-bound process, bounded in time
                        burn = "import time\nend = time.time() + 600\nwhile time.time() < end: pass"
                        neighbour = subprocess.Popen([sys.executable, "-c", burn])
                        time.sleep(0.5)
                    try:
                        decode = stream_completion(server.url, [1, 2, 3 + repeat], max_tokens=decode_tokens)
                        seed = 3 + 2 * repeat + busy  # a new prompt each time: no cache hit
                        prefill = stream_completion(server.url, random_ids(prompt_tokens, vocab, seed=seed), 1)
                    finally:
                        if neighbour is not None:
                            neighbour.kill()
                            neighbour.wait()
                    speeds.append(1e3 / decode["ms_per_token"])
                    prefills.append(prefill["ttft_s"])
                key = "busy" if busy else "idle"
                result[f"{key}_tokens_per_s"] = statistics.median(speeds)
                result[f"{key}_prefill_s"] = statistics.median(prefills)
            result["decode_slowdown"] = result["idle_tokens_per_s"] / result["busy_tokens_per_s"]
            result["prefill_slowdown"] = result["busy_prefill_s"] / result["idle_prefill_s"]
            rows.append(result)
            print(f"  threads {name}: {result}", flush=True)
    return rows


# ------------------------------------------------------------------------------------ report
def render(results: dict) -> str:
    """The tables of the parts in `results` (a part not run yet is left out)."""
    out: list[str] = []
    if "engine" in results:
        out += ["### 1. One conversation to 1M tokens (engine, default settings)", "",
                "| context | cached tokens | decode ms/token | 1K alongside | vs 1K | state bytes | process RSS "
                "| prefix cache bytes |", "|---|---|---|---|---|---|---|---|"]
        for r in results["engine"]["stages"]:
            out.append(f"| {r['context']:,} | {r['cached_tokens']:,} | {r['decode_ms']:.2f} | {r['decode_1k_ms']:.2f} "
                       f"| {r['vs_1k']:.3f}x | {r['state_bytes']:,} | {r['rss_bytes'] / 2**20:,.0f} MiB "
                       f"| {r['prefix_cache_bytes'] / 2**20:,.0f} MiB |")
        out += ["", "| prefill window (tokens) | tokens/s |", "|---|---|"]
        out += [f"| {w['window_start']:,} - {w['window_start'] + WINDOW:,} | {w['tokens_per_s']:,.0f} |"
                for w in results["engine"]["prefill_windows"]]
        out.append("")
    if "http_itl" in results:
        out += ["### 2. Time between streamed tokens over HTTP (server started with no flags)", "",
                "| context | ms between tokens | vs 1K | cached tokens |", "|---|---|---|---|"]
        out += [f"| {r['context']:,} | {r['ms_per_token']:.2f} | {r['vs_1k']:.3f}x | {r['cached_tokens']:,} |"
                for r in results["http_itl"]]
        out.append("")
    if "chat" in results:
        out += ["### 3. A long chat over HTTP (default flags) vs an equal-size transformer", "",
                "| turn | context tokens | Megalodon TTFT | cached tokens | transformer TTFT | transformer KV |",
                "|---|---|---|---|---|---|"]
        for r in results["chat"]:
            base = f"{r['baseline_ttft_s']:.2f} s" if r["baseline_ttft_s"] is not None else "exceeds its KV budget"
            out.append(f"| {r['turn']} | {r['context_tokens']:,} | {r['ttft_s']:.2f} s | {r['cached_tokens']:,} "
                       f"| {base} | {r['baseline_kv_bytes'] / 2**20:,.0f} MiB |")
        out.append("")
    if "threads" in results:
        out += ["### 4. A busy neighbour (one CPU-bound process beside the server)", "",
                "| threads | count | decode tok/s idle | busy | slowdown | 2K-token TTFT idle | busy | slowdown |",
                "|---|---|---|---|---|---|---|---|"]
        for r in results["threads"]:
            out.append(f"| {r['variant']} | {r['threads']} | {r['idle_tokens_per_s']:.1f} "
                       f"| {r['busy_tokens_per_s']:.1f} | {r['decode_slowdown']:.2f}x | {r['idle_prefill_s']:.2f} s "
                       f"| {r['busy_prefill_s']:.2f} s | {r['prefill_slowdown']:.2f}x |")
    return "\n".join(out).rstrip()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    stages = results["engine"]["stages"]
    axes[0].plot([r["context"] for r in stages], [r["decode_ms"] for r in stages], "-o", label="engine")
    itl = results["http_itl"]
    axes[0].plot([r["context"] for r in itl], [r["ms_per_token"] for r in itl], "-s", label="HTTP stream")
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="ms per token", ylim=(0, None),
                title="decode cost vs context")
    chat = results["chat"]
    axes[1].plot([r["context_tokens"] for r in chat], [r["ttft_s"] for r in chat], "-o", label="Megalodon")
    base = [(r["context_tokens"], r["baseline_ttft_s"]) for r in chat if r["baseline_ttft_s"] is not None]
    if base:
        axes[1].plot(*zip(*base, strict=True), "--s", label="transformer (KV kept)")
    axes[1].set(xlabel="chat context tokens", ylabel="time to first token (s)", title="long chat, ~8K new per turn")
    windows = results["engine"]["prefill_windows"]
    axes[2].plot([w["window_start"] for w in windows], [w["tokens_per_s"] for w in windows], "-o")
    axes[2].set(xlabel="context position", ylabel="prefill tokens/s", ylim=(0, None), title="prefill to 1M")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--kv-budget-gb", type=float, default=2.0, help="the transformer's KV-cache budget")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4],
                        help="which parts to run; the others are read back from --out's long_context.json")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of part 4 (medians reported)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved decode rounds of parts 1 and 2")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        stages, itl_contexts, turn_tokens, turns, decode, prefill = [1024, 8192, 32768], [1024, 8192], 2048, 4, 64, 1024
    else:
        stages, itl_contexts = [1024, 65536, 262144, 1_000_000], [1024, 40960, 262144]
        turn_tokens, turns, decode, prefill = 8192, 16, 128, 2048
    print(f"demo model, {usable_cpus()} usable CPUs, torch {torch.__version__}", flush=True)
    saved = args.out / "long_context.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    runs = {1: ("engine", lambda: grow_conversation(stages, decode_tokens=64, rounds=args.rounds)),
            2: ("http_itl", lambda: http_itl(itl_contexts, args.out, rounds=args.rounds)),
            3: ("chat", lambda: long_chat(turn_tokens, turns, args.kv_budget_gb, args.out)),
            4: ("threads", lambda: busy_neighbour(decode, prefill, args.out, args.repeats))}
    for part in args.parts:
        key, run = runs[part]
        results[key] = run()
    table = render(results)
    print(table)
    (args.out / "long_context.json").write_text(json.dumps(results, indent=1))
    (args.out / "long_context.md").write_text(table + "\n")
    if all(key in results for key in ("engine", "http_itl", "chat")):
        plot(results, args.out / "long_context.png")
        print(f"wrote {args.out / 'long_context.png'}")


if __name__ == "__main__":
    main()
