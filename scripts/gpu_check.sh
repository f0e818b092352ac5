#!/usr/bin/env bash
# GPU acceptance check of the fused decode kernels, on one H200 (fits in 8 minutes):
#   1. build the CPU + CUDA extensions for sm_90 (cold: ~1-2 min);
#   2. tests/kernels: CUDA kernels vs the torch reference, CUDA-graph decode vs eager, CPU twins;
#   3. bench/gpu_decode_bench.py: mega7.1B-shape decode (4 of 32 layers), reference eager vs fused
#      vs fused + CUDA graph at batch 1/16/64/256, and the attention kernel's achieved bandwidth
#      against the measured device-to-device copy bandwidth.
# Logs, JSON and the markdown tables go to $OUT (default /tmp/gpu_check_out); the table prints last.
# Every stage has its own time limit; a failed stage is reported with its log tail and the script
# exits non-zero after the remaining independent stages.
#
# The GPU image has no pydantic (megalodon_infer.config needs it): run scripts/fetch_gpu_wheels.sh on
# the dev machine first and carry `.whl`; this script installs them when pydantic is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/megalodon_extensions}
export MEGALODON_KERNELS=auto
start=$SECONDS

if ! "$PY" -c "import pydantic" >/dev/null 2>&1; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "import pydantic" || {
    echo "FAIL: pydantic is missing; run scripts/fetch_gpu_wheels.sh on the dev machine and carry .whl"
    exit 1
  }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt" || true

failed=()
# stage NAME SECONDS CMD...: run CMD with a time limit, its output in $OUT/NAME.log.
stage() {
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "   ok   $name in $((SECONDS - t0)) s"
  else
    echo "   FAIL $name: exit $rc after $((SECONDS - t0)) s (124 = time limit); last lines of $OUT/$name.log:"
    tail -n 40 "$OUT/$name.log"
    failed+=("$name")
  fi
  return 0
}

stage build 180 "$PY" -c "
from megalodon_infer.kernels import load_cuda_extension, active_backend
print('extension loaded in %.1f s' % load_cuda_extension())
assert active_backend('cuda') == 'fused', active_backend('cuda')
"
if [[ ${#failed[@]} -eq 0 ]]; then
  stage tests 120 "$PY" -m pytest tests/kernels -q -rs -p no:cacheprovider
  stage bench 180 "$PY" bench/gpu_decode_bench.py --out "$OUT" --layers 4 --batches 1 16 64 256
fi

echo "== done in $((SECONDS - start)) s"
grep -E "passed|failed" "$OUT/tests.log" 2>/dev/null | tail -n 1 || true
[[ -f "$OUT/gpu_bench.md" ]] && cat "$OUT/gpu_bench.md"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
