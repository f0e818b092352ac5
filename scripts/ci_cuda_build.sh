#!/usr/bin/env bash
# CUDA build check for CI, no GPU needed:
#   1. every csrc/cuda/*.cu compiled by nvcc alone (no torch headers) for sm_80 and sm_90;
#   2. the full torch CUDA extension (csrc/ CPU + CUDA) built, linked and imported against the
#      CUDA build of torch 2.14.1, in a cached virtual environment beside the CPU one.
# Prints "SKIP: ..." and exits 0 only when nvcc is absent; any other failure exits non-zero.
#
# Caches (idempotent; a warm run takes seconds): the venv at $MEGALODON_CUDA_VENV (default
# ~/.cache/megalodon_infer/venv-cuda-torch2.14.1, ~5.5 GB, ~2 min to create from the local wheel) and
# the extension build folders under $TORCH_EXTENSIONS_DIR (default ~/.cache/megalodon_infer/extensions).
# Cold: ~1 min for the extension on 2 cores, ~3 GB peak RAM.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA_VERSION=2.14.1

if ! command -v nvcc >/dev/null 2>&1; then
  echo "SKIP: nvcc not found on PATH: CUDA sources not compiled, CUDA extension not built"
  exit 0
fi

# The toolkit root: the nvcc on PATH may be a wrapper script (as on our CI image), so ask nvcc.
if [[ -z "${CUDA_HOME:-}" ]]; then
  top=$(nvcc -v --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [[ -n "$top" ]] || { echo "FAIL: cannot find the CUDA toolkit root from nvcc; set CUDA_HOME"; exit 1; }
  CUDA_HOME=$(cd "$top" && pwd -P)
fi
export CUDA_HOME

echo "== nvcc alone: csrc/cuda/*.cu for sm_80 and sm_90 (CUDA_HOME=$CUDA_HOME)"
objects=$(mktemp -d)
trap 'rm -rf "$objects"' EXIT
for arch in 80 90; do
  for src in csrc/cuda/*.cu; do
    nvcc -std=c++17 -O3 -arch="sm_$arch" --Werror all-warnings -c "$src" \
      -o "$objects/$(basename "$src" .cu).sm_$arch.o"
    echo "   ok   $src  sm_$arch"
  done
done

VENV=${MEGALODON_CUDA_VENV:-$HOME/.cache/megalodon_infer/venv-cuda-torch$TORCH_CUDA_VERSION}
PY="$VENV/bin/python"
# pip's local-mirror configuration warns once per missing index folder; keep the log readable.
quiet_pip() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
check_torch="import torch; assert torch.__version__.startswith('$TORCH_CUDA_VERSION'), torch.__version__; assert torch.version.cuda"
if ! "$PY" -c "$check_torch" >/dev/null 2>&1; then
  echo "== creating $VENV (torch==$TORCH_CUDA_VERSION, CUDA build, once)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  quiet_pip "torch==$TORCH_CUDA_VERSION"
  "$PY" -c "$check_torch"
fi
"$PY" -c "import ninja, setuptools, numpy" >/dev/null 2>&1 || quiet_pip ninja setuptools numpy
export PATH="$VENV/bin:$PATH"

echo "== torch CUDA extension against $("$PY" -c 'import torch; print(torch.__version__)')"
# build.py needs only torch, so load it by path: this venv has none of the package's other dependencies.
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}" "$PY" - <<'EOF'
import importlib.util
import warnings

import torch

warnings.filterwarnings("ignore", message="No CUDA runtime is found")
spec = importlib.util.spec_from_file_location("megalodon_build", "megalodon_infer/kernels/build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
seconds = build.load_cuda_extension()
ops = ("tsn_cema_step", "tsn_step", "attention_decode")
missing = [f"{op}/{key}" for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"megalodon::{op}", key)]
if missing:
    raise SystemExit(f"FAIL: imported, but these ops have no kernel: {missing}")
print(f"   ok   megalodon_kernels_cpu + megalodon_kernels_cuda built and imported in {seconds:.1f} s; "
      f"ops {', '.join(ops)} registered for CPU and CUDA")
EOF
