"""Build the decode kernels into an image at `docker build` time, and prove the runtime stage reuses them.

Owns one step of both Dockerfiles and nothing else; it knows the kernels only through
`megalodon_infer.kernels.build` (its `load_*_extension` functions and its `$TORCH_EXTENSIONS_DIR` cache).

    python build_kernels.py [--cuda]                    # builder stage: compile and load
    python build_kernels.py [--cuda] --expect-prebuilt  # runtime stage: load, and fail if anything recompiled

NOTE: torch's JIT loader runs ninja in every new process. Ninja is a no-op only when the build
directory, the csrc/ path, the compiler flags (TORCH_CUDA_ARCH_LIST, CUDA_HOME, ...) and every header
ninja recorded are the same as at build time; otherwise it recompiles, which the runtime stage (no
compiler, no CUDA headers) cannot do. `--expect-prebuilt` turns a silent recompile, or a compiler
error at the first request, into an image build failure that names the cause.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _snapshot(root: Path) -> dict[str, int]:
    """mtime (ns) of every compiled artefact under the extension cache."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.suffix in (".so", ".o")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA extension (needs a CUDA torch)")
    parser.add_argument("--expect-prebuilt", action="store_true",
                        help="fail unless every extension loads from the cache without compiling")
    args = parser.parse_args(argv)

    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        # Without it the cache lands in $HOME, which differs between the build and runtime users.
        print("build_kernels: TORCH_EXTENSIONS_DIR must be set", file=sys.stderr)
        return 2
    from megalodon_infer.kernels import build

    root = build.build_root()
    before = _snapshot(root) if root.exists() else {}
    if args.expect_prebuilt and not before:
        print(f"build_kernels: no prebuilt kernels under {root}", file=sys.stderr)
        return 1
    try:
        seconds = build.load_cuda_extension() if args.cuda else build.load_cpu_extension()
    except build.ExtensionBuildError as exc:
        print(f"build_kernels: {exc}", file=sys.stderr)
        return 1
    after = _snapshot(root)
    if args.expect_prebuilt and after != before:
        changed = sorted(path for path in after if before.get(path) != after[path])
        print("build_kernels: the kernels were recompiled at load time, so the runtime environment differs "
              f"from the builder's (paths, flags or headers): {changed}", file=sys.stderr)
        return 1
    print(f"build_kernels: loaded {sorted(build.loaded_extensions())} from {root} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
