"""What this process may use: CPUs (affinity and cgroup quota) and memory (host and device).

Owns the rules behind two defaults, each computed once at start and logged:

- Torch threads: one less than the CPUs this process may use, at least one. A CPU quota smaller than
  the visible cores (a container) counts as the quota. NOTE: measured on a 2-core machine, torch's
  own default (one thread per visible core) turns a busy neighbour into a 55x slowdown of a prefill
  step (its OpenMP threads wait at barriers for a descheduled peer), and the server's event loop and
  engine thread are such neighbours themselves; leaving one CPU free keeps that cost under 2x
  (`bench/long_context_bench.py` measures it).
- The prefix cache's budget: 25% of the memory free on the model's device after the weights and the
  state slots are allocated, and a host tier of 25% of the available host memory when the device is
  a GPU (none on the CPU, where the device tier is host memory already).

Reads /proc and /sys/fs/cgroup only; the roots are arguments so tests can point them at fakes.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
CACHE_FRACTION = 0.25


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup directories, innermost first, up to `root` (v2 and v1 layouts)."""
    dirs: list[Path] = []
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        bases = [root] if controllers == "" else [root / c for c in controllers.split(",")] + [root / controllers]
        for base in bases:
            path = base / rel.lstrip("/")
            while True:
                dirs.append(path)
                if path == base:
                    break
                path = path.parent
    return dirs + [root, root / "cpu", root / "cpu,cpuacct", root / "memory"]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroups, in CPUs (None: no quota)."""
    limits = []
    for directory in _cgroup_dirs(root, proc_cgroup):
        v2 = _read(directory / "cpu.max")
        if v2 is not None:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
            continue
        quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if quota is not None and period is not None and int(quota) > 0:
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may run on at once: its affinity mask, capped by its cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def default_torch_threads(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """The thread policy (module docstring): usable CPUs minus one, at least one."""
    return max(1, usable_cpus(root, proc_cgroup) - 1)


def apply_torch_threads(requested: int | None) -> int:
    """Set torch's intra-op threads to `requested`, or to the policy's default; returns the count."""
    threads = requested if requested is not None else default_torch_threads()
    torch.set_num_threads(threads)
    why = "requested" if requested is not None else f"{usable_cpus()} usable CPUs, one left free"
    logger.info("torch threads: %d (%s)", threads, why)
    return threads


def available_host_bytes(meminfo: Path = MEMINFO, root: Path = CGROUP_ROOT,
                         proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Host memory this process can still take: MemAvailable, capped by its cgroup's room."""
    available = None
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for directory in _cgroup_dirs(root, proc_cgroup):
        limit = _read(directory / "memory.max") or _read(directory / "memory.limit_in_bytes")
        used = _read(directory / "memory.current") or _read(directory / "memory.usage_in_bytes")
        if limit is not None and limit != "max" and used is not None and int(limit) < 1 << 60:
            available = min(available, max(0, int(limit) - int(used)))
    return available


@dataclass(frozen=True)
class CacheBudget:
    device_bytes: int
    host_bytes: int
    reason: str


def prefix_cache_budget(device: torch.device, device_bytes: int | None, host_bytes: int | None) -> CacheBudget:
    """The prefix cache's tiers: the configured bytes where given, else the rule (module docstring).
    Call after the weights and the state slots are allocated, so "free" means free for the cache."""
    reasons = []
    if device_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            reasons.append(f"device tier 25% of {_gib(free)} free on {device}")
        else:
            free = available_host_bytes()
            reasons.append(f"device tier 25% of {_gib(free)} available host memory")
        device_bytes = int(free * CACHE_FRACTION)
    if host_bytes is None:
        if device.type == "cpu":
            host_bytes = 0
        else:
            available = available_host_bytes()
            host_bytes = int(available * CACHE_FRACTION)
            reasons.append(f"host tier 25% of {_gib(available)} available host memory")
    return CacheBudget(device_bytes, host_bytes, "; ".join(reasons) or "configured")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
