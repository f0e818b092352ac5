"""The kernel build cache: a build killed half way (its lock file left behind) never hangs a later process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from megalodon_infer.kernels.build import _build_dir, build_root, load_cpu_extension

pytestmark = pytest.mark.slow

LOAD = "from megalodon_infer.kernels.build import load_cpu_extension; load_cpu_extension(); print('loaded')"


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path):
    load_cpu_extension()  # the shared cache is warm (built here if it was not)
    warm = _build_dir("megalodon_kernels_cpu")
    cache = tmp_path / "extensions"
    copy = cache / warm.relative_to(build_root())
    shutil.copytree(warm, copy)  # mtimes kept: ninja sees nothing to rebuild
    (copy / "lock").touch()  # what torch leaves when its builder is killed mid-build

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)}
    # without the fix this waits for the lock forever; the timeout turns that into a failure
    done = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("loaded")
    assert not (copy / "lock").exists()
