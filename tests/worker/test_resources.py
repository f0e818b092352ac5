"""The defaults sized from what this process may use: torch threads and the prefix cache's budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalodon_infer.worker import resources


def fake_cgroup(tmp_path: Path, files: dict[str, str], proc_line: str = "0::/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_threads_follow_the_affinity_mask_leaving_one_cpu(tmp_path, four_cpus):
    root, proc = fake_cgroup(tmp_path, {"cpu.max": "max 100000"})
    assert resources.usable_cpus(root, proc) == 4
    assert resources.default_torch_threads(root, proc) == 3


def test_a_cgroup_quota_below_the_visible_cores_caps_the_threads(tmp_path, four_cpus):
    """A container given 1.5 CPUs on a 4-core host: 2 usable CPUs, so 1 torch thread."""
    root, proc = fake_cgroup(tmp_path, {"kubepods/pod1/cpu.max": "150000 100000", "cpu.max": "max 100000"},
                             proc_line="0::/kubepods/pod1")
    assert resources.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    assert resources.usable_cpus(root, proc) == 2
    assert resources.default_torch_threads(root, proc) == 1


def test_cgroup_v1_quota_and_no_quota(tmp_path, four_cpus):
    root, proc = fake_cgroup(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "100000",
                                        "cpu,cpuacct/cpu.cfs_period_us": "100000"},
                             proc_line="4:cpu,cpuacct:/")
    assert resources.usable_cpus(root, proc) == 1 and resources.default_torch_threads(root, proc) == 1
    root, proc = fake_cgroup(tmp_path / "none", {"cpu,cpuacct/cpu.cfs_quota_us": "-1",
                                                 "cpu,cpuacct/cpu.cfs_period_us": "100000"},
                             proc_line="4:cpu,cpuacct:/")
    assert resources.cgroup_cpu_limit(root, proc) is None and resources.usable_cpus(root, proc) == 4


def test_available_memory_is_capped_by_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 32000000 kB\nMemAvailable: 16000000 kB\n")
    root, proc = fake_cgroup(tmp_path, {"memory.max": str(4 << 30), "memory.current": str(1 << 30)})
    assert resources.available_host_bytes(meminfo, root, proc) == 3 << 30
    root, proc = fake_cgroup(tmp_path / "nolimit", {"memory.max": "max", "memory.current": "1"})
    assert resources.available_host_bytes(meminfo, root, proc) == 16000000 * 1024


def test_prefix_cache_budget_rule_and_explicit_sizes(monkeypatch):
    monkeypatch.setattr(resources, "available_host_bytes", lambda *a: 8 << 30)
    budget = resources.prefix_cache_budget(torch.device("cpu"), None, None)
    assert (budget.device_bytes, budget.host_bytes) == (2 << 30, 0)
    assert "25%" in budget.reason
    explicit = resources.prefix_cache_budget(torch.device("cpu"), 123, 45)
    assert (explicit.device_bytes, explicit.host_bytes) == (123, 45)
    assert resources.prefix_cache_budget(torch.device("cpu"), 0, None).device_bytes == 0  # 0 turns it off


def test_engine_config_threads_default_and_explicit(monkeypatch):
    monkeypatch.setattr(resources, "usable_cpus", lambda *a: 2)
    before = torch.get_num_threads()
    try:
        assert resources.apply_torch_threads(None) == 1 and torch.get_num_threads() == 1
        assert resources.apply_torch_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
