"""Scale-out on Ray Serve: throughput and turn-2 time to first token, 1 vs 2 replicas, affine vs round robin.

One run, one workload, four deployments of the bundled demo model, each engine on one CPU thread:

- `1 replica`: megalodon-serve-cluster --replicas 1 (session ids sent);
- `2 replicas, affine`: --replicas 2, session ids sent: each conversation stays on its replica;
- `2 replicas, no key + state store`: --replicas 2, no session ids (least-loaded routing): turn 2 often
  lands on the other replica, which resumes from the shared state store;
- `2 replicas, round robin`: two plain megalodon-serve processes, the client alternating between them
  (the old compose overlay's routing, no shared state): a turn 2 on the other replica re-prefills.

Workload: `--conversations` chats of two turns, `--concurrency` at a time; turn 1 is a long prompt
(a source file of the standard library, ~`--prompt-tokens` tokens), turn 2 a short follow-up.
Throughput counts generated tokens over the whole run; TTFT is the first streamed token of turn 2.

    python bench/cluster_bench.py            # writes bench/out/cluster_bench.{json,md}
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_process import Server  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SOURCES = sorted(Path(json.__file__).resolve().parents[1].glob("*.py"))


def first_turns(count: int, prompt_tokens: int) -> list[str]:
    """Distinct long first messages: the head of a different stdlib module each (~4 characters a token)."""
    texts = (path.read_text(errors="replace") for path in SOURCES)
    heads = [text[:prompt_tokens * 4] for text in texts if len(text) >= prompt_tokens * 4]
    return [f"Explain this module:\n{head}" for head in heads[:count]]


def chat(url: str, history: list[dict], key: str | None, max_tokens: int) -> tuple[str, float, int, dict]:
    """One streamed turn: (reply, seconds to the first token, tokens, usage)."""
    headers = {"X-Session-Id": key} if key else {}
    body = {"messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, pieces, usage = time.monotonic(), None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta:
                first = first if first is not None else time.monotonic() - start
                pieces.append(delta)
    return "".join(pieces), first if first is not None else float("nan"), len(pieces), usage


def run_workload(pick_url: Callable[[], str], keyed: bool, args: argparse.Namespace) -> dict:
    openers = first_turns(args.conversations, args.prompt_tokens)
    ttft2: list[float] = []
    hits = 0
    tokens = 0
    lock = threading.Lock()

    def conversation(i: int) -> None:
        nonlocal tokens, hits
        key = f"bench-{i}" if keyed else None
        history = [{"role": "user", "content": openers[i]}]
        reply, _, n1, usage1 = chat(pick_url(), history, key, args.max_tokens)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Summarize it in a line."}]
        _, first, n2, usage2 = chat(pick_url(), history, key, args.max_tokens)
        with lock:
            ttft2.append(first)
            # resumed: the cached state covers the whole first turn, not just a shared template head
            hits += usage2["prompt_tokens_details"]["cached_tokens"] >= usage1["prompt_tokens"]
            tokens += n1 + n2

    start = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(conversation, range(args.conversations)))
    elapsed = time.monotonic() - start
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "ttft2_p50_s": statistics.median(ttft2),
            "ttft2_mean_s": statistics.fmean(ttft2), "turn2_resumed": hits / len(ttft2)}


def cluster_args(replicas: int, store: Path) -> list[str]:
    return ["--replicas", str(replicas), "--num-cpus", str(replicas), "--torch-threads", "1",
            "--state-store-dir", str(store), "--log-level", "warning"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    env = {"RAY_USAGE_STATS_ENABLED": "0", **os.environ}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, replicas, keyed in (("1 replica", 1, True), ("2 replicas, affine", 2, True),
                                      ("2 replicas, no key + state store", 2, False)):
            store = Path(tmp) / name.replace(" ", "_").replace(",", "").replace("+", "")
            with Server(cluster_args(replicas, store), OUT / "cluster_bench_server.log", env,
                        module="megalodon_cluster.cli") as cluster:
                results[name] = run_workload(lambda url=cluster.url: url, keyed, args)
            print(name, results[name], flush=True)
        with ExitStack() as stack:
            servers = [stack.enter_context(Server(["--torch-threads", "1", "--log-level", "warning"],
                                                  OUT / f"cluster_bench_rr{i}.log", env)) for i in range(2)]
            turn = itertools.cycle([s.url for s in servers])
            lock = threading.Lock()

            def round_robin() -> str:
                with lock:
                    return next(turn)

            results["2 replicas, round robin"] = run_workload(round_robin, False, args)
            print("2 replicas, round robin", results["2 replicas, round robin"], flush=True)
    (OUT / "cluster_bench.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    base = results["1 replica"]
    lines = ["| deployment | tokens/s | vs 1 replica | turn-2 TTFT p50 (ms) | turn-2 TTFT mean (ms) | "
             "TTFT p50 vs 1 replica | turn 2 resumed from a state |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{r['ttft2_p50_s'] * 1000:.0f} | {r['ttft2_mean_s'] * 1000:.0f} | "
              f"{r['ttft2_p50_s'] / base['ttft2_p50_s']:.2f}x | {r['turn2_resumed']:.0%} |"
              for name, r in results.items()]
    (OUT / "cluster_bench.md").write_text("\n".join(lines) + "\n")
    plot(results, OUT / "cluster_bench.png")
    print("\n".join(lines))


def plot(results: dict[str, dict], path: Path) -> None:
    """Two panels: throughput and turn-2 TTFT (p50) per deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.barh(names, [results[n]["tokens_per_s"] for n in names])
    left.set_xlabel("generated tokens/s (whole run)")
    right.barh(names, [results[n]["ttft2_p50_s"] * 1000 for n in names])
    right.set_xlabel("turn-2 time to first token, p50 (ms)")
    right.set_yticks(range(len(names)), [""] * len(names))
    left.invert_yaxis()
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
