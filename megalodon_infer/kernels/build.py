"""Build and load the C++/CUDA decode extensions (JIT through torch.utils.cpp_extension, cached).

Owns finding `csrc/`, the compiler flags and the build cache; it knows nothing of the model. Both
extensions are loaded as plain shared libraries that register `torch.ops.megalodon.*` (no Python
module): the CPU one defines the op schemas and CPU kernels, the CUDA one adds CUDA kernels for the
same schemas and therefore always loads after it.

Build cache: `$TORCH_EXTENSIONS_DIR` if set, else `~/.cache/megalodon_infer/extensions`, one folder per
(extension, torch version, Python version). A warm cache loads in well under a second; torch rebuilds
when a source file changes.

Processes sharing a cache take turns through an `flock` on the folder, which the kernel releases when
its holder exits, however it exits. torch's own guard is a `lock` file that a builder removes when it
finishes: one killed mid-build (a server stopped while it compiled) leaves it behind, and every later
process would wait for it forever. Under the flock no one else is building, so such a file is stale
and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
CPU_SOURCES = ("bindings.cpp", "cpu/tsn_cema.cpp", "cpu/attention.cpp")
CUDA_SOURCES = ("cuda/bindings.cpp", "cuda/tsn_cema.cu", "cuda/attention.cu")
CPU_CFLAGS = ("-O3", "-fopenmp")
CUDA_NVCC_FLAGS = ("-O3", "-lineinfo")


class ExtensionBuildError(RuntimeError):
    """A decode extension failed to compile, link or load; the message carries the compiler's reason."""


def csrc_dir() -> Path:
    """The `csrc/` tree: `$MEGALODON_CSRC`, else shipped in the package, else beside the package (a checkout)."""
    candidates = []
    if os.environ.get("MEGALODON_CSRC"):
        candidates.append(Path(os.environ["MEGALODON_CSRC"]))
    candidates += [_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR.parents[1] / "csrc"]
    for path in candidates:
        if (path / "bindings.cpp").is_file():
            return path
    raise ExtensionBuildError(f"csrc/ not found (looked in {', '.join(str(p) for p in candidates)})")


def build_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(base) if base else Path.home() / ".cache" / "megalodon_infer" / "extensions"


def _build_dir(name: str) -> Path:
    tag = f"{name}-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    path = build_root() / tag.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


_lock = threading.Lock()
_loaded: dict[str, float] = {}  # extension name -> seconds the load (and any build) took


@contextlib.contextmanager
def _build_turn(build_dir: Path) -> Iterator[None]:
    """This process's turn at `build_dir` among processes sharing it; clears a dead builder's lock file."""
    with open(build_dir / ".megalodon_build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits while a live process builds; released if it dies
        try:
            stale = build_dir / "lock"  # torch's FileBaton
            if stale.exists():
                logger.warning("removing %s, left by a build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(name: str, sources: tuple[str, ...], extra_include_paths_more: list[str] | None = None,
          **kwargs: object) -> float:
    """Compile (if stale) and load one extension once per process; returns the seconds it took."""
    from torch.utils import cpp_extension  # deferred: imports setuptools, slow and unused on the reference path

    with _lock:
        if name in _loaded:
            return _loaded[name]
        root = csrc_dir()
        build_dir = _build_dir(name)
        logger.info("loading %s from %s (compiled on first use, cached in %s)", name, root, build_dir)
        start = time.perf_counter()
        try:
            with _build_turn(build_dir):
                cpp_extension.load(
                    name=name,
                    sources=[str(root / s) for s in sources],
                    extra_include_paths=[str(root), *(extra_include_paths_more or [])],
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=os.environ.get("MEGALODON_KERNELS_VERBOSE") == "1",
                    **kwargs,
                )
        except Exception as exc:  # noqa: BLE001 - compiler, linker and loader errors all mean "no extension"
            raise ExtensionBuildError(f"building/loading {name} from {root} failed: {exc}") from exc
        _loaded[name] = time.perf_counter() - start
        return _loaded[name]


def load_cpu_extension() -> float:
    """Build (if needed) and load the CPU extension; raises ExtensionBuildError. Returns seconds taken."""
    return _load("megalodon_kernels_cpu", CPU_SOURCES, extra_cflags=list(CPU_CFLAGS),
                 extra_ldflags=["-fopenmp"])


def cuda_library_includes() -> list[str]:
    """Header folders of the CUDA libraries torch's headers include (cuBLAS, cuSPARSE, ...) when the
    toolkit at $CUDA_HOME lacks them: pip-installed torch carries them in `site-packages/nvidia/*/include`."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cublas_v2.h").is_file():
        return []
    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return [str(d) for d in sorted(site.glob("*/include")) if (d / "cublas_v2.h").is_file()]


def load_cuda_extension() -> float:
    """Build (if needed) and load the CUDA extension (after the CPU one, which defines the ops).

    Needs $CUDA_HOME to name the toolkit root when torch cannot find it, and $TORCH_CUDA_ARCH_LIST to
    build for a GPU other than the visible one (e.g. "8.0;9.0" on a machine without a GPU).
    """
    if torch.version.cuda is None:
        raise ExtensionBuildError(f"torch {torch.__version__} is a CPU build: no CUDA extension")
    seconds = load_cpu_extension()
    return seconds + _load("megalodon_kernels_cuda", CUDA_SOURCES, extra_cflags=["-O3"],
                           extra_cuda_cflags=list(CUDA_NVCC_FLAGS), extra_include_paths_more=cuda_library_includes())


def loaded_extensions() -> dict[str, float]:
    """Extensions loaded in this process, with the seconds each load took."""
    return dict(_loaded)
