"""Where should a replica put a finished conversation's state: a shared folder, or Ray's object store?

Times one write and one read of a state by another process, for three sizes: the demo model's state
after a 1000-token conversation, and synthetic states of 8 and 64 MiB (a 7B-class model's state is in
that range: `megalodon-infer info`). Folder: `core.sessions` save/load (the store's format) on local
disk. Object store: `ray.put` in one Ray worker, `ray.get` in the driver (a local cluster on
loopback). Median of `--repeats`.

    python bench/state_store_bench.py        # writes bench/out/state_store_bench.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megalodon_infer.core.sessions import Session, load_session, save_session
from megalodon_infer.core.state_pool import SlotSnapshot

OUT = Path(__file__).resolve().parent / "out"


def demo_state() -> SlotSnapshot:
    from megalodon_infer import SamplingParams
    from megalodon_infer.config import EngineConfig
    from megalodon_infer.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(prefix_cache_bytes=1 << 28, torch_threads=1))
    engine.add_request("r", list(range(3, 1003)), SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    hit = engine.prefix_cache.lookup(list(range(3, 1003)))
    return hit.entry.snapshot


def synthetic_state(nbytes: int) -> SlotSnapshot:
    """A state of `nbytes` bytes: CEMA (complex64) and keys take `floats` / 2 entries, values `floats`."""
    floats = (nbytes - 2 * 8 * 64 * 4) // 10  # 8 * floats/2 + 4 * floats/2 + 4 * floats = 10 * floats, + norm stats
    return SlotSnapshot(position=1000, norm_mean=torch.randn(8, 64), norm_var=torch.rand(8, 64),
                        cema_h=torch.randn(floats // 2, dtype=torch.complex64), keys=torch.randn(floats // 2),
                        values=torch.randn(floats))


def folder_times(snapshot: SlotSnapshot, repeats: int) -> tuple[float, float]:
    writes, reads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            start = time.perf_counter()
            save_session(Path(tmp), Session(f"s{i}", list(range(snapshot.position)), snapshot, None), "f")
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_session(Path(tmp), f"s{i}", "f", 1 << 31)
            reads.append(time.perf_counter() - start)
    return statistics.median(writes), statistics.median(reads)


def object_store_times(snapshot: SlotSnapshot, repeats: int) -> tuple[float, float]:
    import ray

    @ray.remote(num_cpus=0)
    class Writer:
        def put(self, state: dict) -> tuple[list, float]:
            start = time.perf_counter()
            ref = ray.put(state)
            return [ref], time.perf_counter() - start

    tensors = {name: getattr(snapshot, name) for name in ("norm_mean", "norm_var", "cema_h", "keys", "values")}
    writer = Writer.remote()
    writes, reads = [], []
    for _ in range(repeats):
        refs, seconds = ray.get(writer.put.remote(tensors))
        writes.append(seconds)
        start = time.perf_counter()
        ray.get(refs[0])
        reads.append(time.perf_counter() - start)
    return statistics.median(writes), statistics.median(reads)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    states = {"demo model, 1000 tokens": demo_state(), "8 MiB": synthetic_state(8 << 20),
              "64 MiB": synthetic_state(64 << 20)}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR")
    lines = ["| state | bytes | folder write (ms) | folder read (ms) | object store put (ms) | object store get (ms) "
             "| folder / object store (write + read) |", "|---|---|---|---|---|---|---|"]
    rows = []
    for name, snapshot in states.items():
        fw, fr = folder_times(snapshot, args.repeats)
        ow, orr = object_store_times(snapshot, args.repeats)
        rows.append((name, fw, fr, ow, orr))
        lines.append(f"| {name} | {snapshot.nbytes():,} | {fw * 1e3:.2f} | {fr * 1e3:.2f} | {ow * 1e3:.2f} | "
                     f"{orr * 1e3:.2f} | {(fw + fr) / (ow + orr):.2f}x |")
        print(lines[-1], flush=True)
    ray.shutdown()
    OUT.mkdir(exist_ok=True)
    (OUT / "state_store_bench.md").write_text("\n".join(lines) + "\n")
    plot(rows, OUT / "state_store_bench.png")
    print("\n".join(lines))


def plot(rows: list[tuple[str, float, float, float, float]], path: Path) -> None:
    """Grouped bars: write and read time of each store, per state size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    labels = ("folder write", "folder read", "object store put", "object store get")
    for k, label in enumerate(labels):
        ax.bar([i + (k - 1.5) * width for i in range(len(rows))], [row[1 + k] * 1e3 for row in rows], width,
               label=label)
    ax.set_xticks(range(len(rows)), [row[0] for row in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title("One state written by one process, read by another")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
