#!/usr/bin/env bash
# GPU acceptance check, one prepared run on one H200 (Python 3.12, torch 2.11 cu130 there), under 8 minutes:
#   setup  install the carried wheels (.whl/, from scripts/fetch_gpu_wheels.sh) into /tmp/site, and a
#          fallback wheel (.whl/fallback/) wherever the image's own version does not satisfy them; check
#          that the server's stack imports; record the device, driver, torch and nvcc;
#   build  the CPU and CUDA decode extensions for sm_90 (TORCH_CUDA_ARCH_LIST=9.0; cold: ~1-2 min);
#   tests  every GPU-marked test of the suite (`pytest -m gpu tests`): the CUDA kernels against their
#          reference on random slots and fills, CUDA graphs against eager decode, seeded sampling with
#          penalties and logit_bias, n > 1, the prefix cache's device tier, sessions, and the real server
#          on --device cuda answering 32 concurrent streams through the openai client;
#   bench  bench/gpu_decode_bench.py: the 7B shape's decode step (reference eager / fused eager / fused +
#          CUDA graph at batch 1, 16, 64, 256), bytes moved against the measured copy bandwidth, the
#          attention kernel's bandwidth, 32K-token prefill, bf16 against fp32 logits.
# Each stage has its own time limit, cut to what the whole budget (GPU_CHECK_BUDGET_S, 460 s: at most 8
# minutes with each kill's 5 s grace) leaves after the later stages' reserves; a failed stage prints its
# log's tail, the independent stages still run, and the script exits 1. The short table prints last.
#
# $OUT (default /tmp/gpu_check_out) gets exactly 8 files, the most a device run brings back: summary.md
# (the table), setup.log, build.log, tests.log, bench.log, gpu_bench.json, gpu_bench.md, gpu_bench.png.
#
# On the device (carry .whl):  bash scripts/gpu_check.sh
# Here, without a GPU:         GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh
#   Every stage runs on the CPU: the wheels install into a scratch folder for CPython 3.12 (a check that
#   the set installs), the test modules are collected with every import refused that neither the GPU image
#   (.whl/gpu_machine_packages.txt) nor the wheels provide, the GPU tests are collected (and skip), their CPU
#   twins run, and the benchmark runs `--device cpu --tiny`. A plumbing check, not a measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET_S:-460}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
rm -f "$OUT"/{summary.md,setup.log,build.log,tests.log,bench.log,gpu_bench.json,gpu_bench.md,gpu_bench.png}
for var in $(compgen -e | grep '^MEGALODON_' || true); do unset "$var"; done  # the tests set what they need
export REPO DRY OUT PY WORK
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MAX_JOBS=${MAX_JOBS:-16}
if [[ $DRY == 1 ]]; then
  export PYTHONPATH=$WORK/guard${PYTHONPATH:+:$PYTHONPATH}  # refuses imports the GPU machine could not serve
else
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/megalodon_extensions}  # the server's children too
  if [[ -z ${CUDA_HOME:-} ]] && command -v nvcc >/dev/null 2>&1; then
    # the toolkit root, from nvcc itself (the nvcc on PATH may be a wrapper script)
    top=$(nvcc -v --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [[ -n $top ]] && CUDA_HOME=$(cd "$top" && pwd -P) && export CUDA_HOME
  fi
fi

# ---------------------------------------------------------------------------------------------- stages
run_setup() {
  echo "date: $(date -u +%FT%TZ); dry run: $DRY; python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
  compgen -G ".whl/*.whl" >/dev/null || { echo "FAIL: no wheels in .whl/: run scripts/fetch_gpu_wheels.sh here"; return 1; }
  local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check)
  if [[ $DRY == 1 ]]; then
    # the same set, installed for CPython 3.12 into a scratch folder: one version of each, tags that fit
    # (the platform tags scripts/fetch_gpu_wheels.sh downloads for: up to manylinux_2_39)
    local tags=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_39_x86_64
                --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
    "${pip[@]}" "${tags[@]}" --target "$WORK/site312" .whl/*.whl .whl/fallback/*.whl || return 1
    echo "ok: $(ls .whl/*.whl .whl/fallback/*.whl | wc -l) wheels install for CPython 3.12 ($WORK/site312)"
    write_import_guard || return 1
  else
    "${pip[@]}" --target /tmp/site .whl/*.whl || return 1
    echo "installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    local need
    need=$(needed_fallbacks) || return 1
    if [[ -n $need ]]; then
      # shellcheck disable=SC2086  # one wheel path per word
      "${pip[@]}" --target /tmp/site $need || return 1
      echo "installed fallbacks: $need"
    fi
  fi
  "$PY" - <<'PYTHON'
import importlib

for name in ("pydantic", "pydantic_settings", "fastapi", "starlette", "uvicorn", "openai", "dockerfile_parse",
             "megalodon_infer.config", "server.app", "tests.harness"):
    module = importlib.import_module(name)
    print(f"import ok: {name} {getattr(module, '__version__', '')}")
PYTHON
}

needed_fallbacks() {  # the .whl/fallback wheels whose package the image lacks or has at a version a wheel refuses
  "$PY" - <<'PYTHON'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

fallback = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in Path(".whl/fallback").glob("*.whl")}
needs: dict[str, list[tuple[str, Requirement]]] = {}
for dist in distributions(path=["/tmp/site"]):
    for line in dist.requires or []:
        req = Requirement(line)
        if (req.marker is None or req.marker.evaluate({"extra": ""})) and canonicalize_name(req.name) in fallback:
            needs.setdefault(canonicalize_name(req.name), []).append((dist.metadata["Name"], req))
for name, wheel in sorted(fallback.items()):
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    refused = [f"{who} needs {req}" for who, req in needs.get(name, [])
               if have is None or not req.specifier.contains(have, prereleases=True)]
    print(f"{name}: image has {have or 'none'}; " + (f"fallback ({'; '.join(refused)})" if refused else "ok"),
          file=sys.stderr)
    if refused:
        print(wheel)
PYTHON
}

write_import_guard() {  # dry run: a sitecustomize that makes what the GPU machine lacks unimportable
  [[ -f .whl/gpu_machine_packages.txt ]] || { echo "FAIL: .whl/gpu_machine_packages.txt missing: run scripts/fetch_gpu_wheels.sh"; return 1; }
  mkdir -p "$WORK/guard"
  "$PY" - "$WORK/guard/sitecustomize.py" <<'PYTHON'
import os
import sys
from importlib.metadata import distributions, packages_distributions
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

allowed = {canonicalize_name(n) for n in Path(".whl/gpu_machine_packages.txt").read_text().split()}
allowed |= {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in Path(".whl").rglob("*.whl")}
# NOTE: the fallbacks count as there: the image has each of them, at some version
allowed.add("megalodon-infer")  # this repo
# pytest plugins stay importable (pytest inspects their modules): run_tests disables those the GPU image lacks
allowed |= {canonicalize_name(d.metadata["Name"]) for d in distributions() if d.entry_points.select(group="pytest11")}
blocked = sorted(module for module, dists in packages_distributions().items()
                 if module.isidentifier() and not any(canonicalize_name(d) in allowed for d in dists)
                 and module not in sys.stdlib_module_names)
Path(sys.argv[1]).write_text(f'''"""gpu_check.sh dry run: what the GPU machine lacks cannot be imported here either.

A None in sys.modules makes `import x` raise ModuleNotFoundError and importlib.util.find_spec("x") return
None, as on a machine without x.
"""
import sys

for _name in {blocked!r}:
    sys.modules.setdefault(_name, None)
''')
print(f"import guard: {len(blocked)} modules installed here but neither on the GPU image nor carried cannot be "
      f"imported in later stages: {', '.join(blocked)}")
PYTHON
}

run_build() {
  local device=cuda
  [[ $DRY == 1 ]] && device=cpu
  MEGALODON_KERNELS_VERBOSE=1 "$PY" - "$device" <<'PYTHON'
import sys

import torch

from megalodon_infer.kernels import active_backend, load_cpu_extension, load_cuda_extension

device = sys.argv[1]
print(f"CPU extension loaded in {load_cpu_extension():.1f} s")
if device == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print(f"CUDA extension loaded in {load_cuda_extension():.1f} s")
ops = ("tsn_cema_step", "tsn_step", "attention_decode")
keys = ("CPU", "CUDA") if device == "cuda" else ("CPU",)
missing = [f"{op}/{key}" for op in ops for key in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"megalodon::{op}", key)]
assert not missing, f"ops without a kernel: {missing}"
assert active_backend(device, "auto") == "fused", active_backend(device, "auto")
print(f"ok: ops {', '.join(ops)} registered for {' and '.join(keys)}; decode on {device} is fused")
PYTHON
}

run_tests() {
  # -p no:asyncio, no:schemathesis: plugins the GPU machine does not have (no GPU test needs them; the dry
  # run's import guard would break schemathesis's imports)
  local common=(-q -rfEs -p no:cacheprovider -p no:asyncio -p no:schemathesis --continue-on-collection-errors)
  # Modules without a GPU test whose imports the GPU machine lacks (Ray, schemathesis, jsonschema: test
  # dependencies too large or too many to carry) are left out of collection; CI runs them.
  local no_gpu_tests=(tests/cluster tests/deploy/test_kuberay.py tests/server/test_openapi_fuzz.py
                      tests/server/test_http_tools.py tests/server/test_http_structured.py
                      tests/server/test_http_responses.py tests/engine/test_structured.py)
  ! grep -l "mark.gpu" -r "${no_gpu_tests[@]}" || { echo "FAIL: a left-out module has GPU tests"; return 1; }
  "$PY" -m pytest -m gpu tests "${no_gpu_tests[@]/#/--ignore=}" "${common[@]}" --junitxml="$WORK/junit-gpu.xml"
  local rc=$?
  if [[ $DRY == 1 ]]; then  # the GPU tests' CPU twins: the same test logic, on the CPU
    "$PY" -m pytest tests/engine/test_cuda_engine.py tests/server/test_cuda_server.py -m "not gpu" "${common[@]}" \
      --junitxml="$WORK/junit-cpu.xml" || rc=$?
  fi
  return $rc
}

run_bench() {
  local budget=$((STAGE_LIMIT - 45)) args=()
  [[ $DRY == 1 ]] && args=(--device cpu --tiny)
  "$PY" bench/gpu_decode_bench.py --out "$OUT" --time-budget "$((budget > 30 ? budget : 30))" "${args[@]}"
}
export -f run_setup needed_fallbacks write_import_guard run_build run_tests run_bench

T0=$SECONDS
failed=0
# stage NAME CAP RESERVE [REQUIRES]: run_NAME under min(CAP, what the budget leaves after RESERVE) seconds;
# skipped when the stage REQUIRES did not pass.
stage() {
  local name=$1 cap=$2 reserve=$3 requires=${4:-} t0=$SECONDS rc=0 status
  local left=$((BUDGET - (SECONDS - T0) - reserve))
  local limit=$((cap < left ? cap : left))
  if [[ -n $requires ]] && ! grep -q "^$requires	ok" "$WORK/stages.tsv" 2>/dev/null; then
    printf '%s\tskipped\t0\t-\t%s did not pass\n' "$name" "$requires" >>"$WORK/stages.tsv"
    echo "== $name: skipped ($requires did not pass)"
    failed=1
    return
  fi
  if (( limit < 15 )); then
    printf '%s\tskipped\t0\t-\tno time left in the %s s budget\n' "$name" "$BUDGET" >>"$WORK/stages.tsv"
    echo "== $name: skipped (no time left)"
    failed=1
    return
  fi
  echo "== $name (limit ${limit} s; log $OUT/$name.log)"
  STAGE_LIMIT=$limit timeout --kill-after=5 "$limit" bash -c "run_$name" >>"$OUT/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=FAIL ;;
  esac
  printf '%s\t%s\t%s\t%s\texit %s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" "$rc" >>"$WORK/stages.tsv"
  echo "   $status $name in $((SECONDS - t0)) s (exit $rc)"
  if [[ $status != ok ]]; then
    failed=1
    tail -n 30 "$OUT/$name.log" | sed 's/^/   | /'
  fi
}

# reserves, as parts of the budget, for the stages after each one (460 s: 368, 230, 92, 5)
stage setup 60 $((BUDGET * 8 / 10))
stage build 200 $((BUDGET / 2))
stage tests 180 $((BUDGET / 5)) build
stage bench 170 5 build

# ------------------------------------------------------------------------------------------------ summary
"$PY" - "$WORK" "$OUT" "$DRY" "$((SECONDS - T0))" "$BUDGET" <<'PYTHON' || failed=1
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, dry, seconds, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
lines = ["# scripts/gpu_check.sh" + (": DRY RUN on the CPU (plumbing check: no GPU, no performance numbers)"
                                      if dry else ""), ""]
setup = (out / "setup.log").read_text(errors="replace").splitlines() if (out / "setup.log").exists() else []
lines += [f"- {line}" for line in setup if line.startswith(("date:", "torch ", "NVIDIA"))]
lines += ["", "| stage | status | seconds | limit | note |", "|---|---|---|---|---|"]
for row in (work / "stages.tsv").read_text().splitlines() if (work / "stages.tsv").exists() else []:
    name, status, secs, limit, note = row.split("\t")
    lines.append(f"| {name} | {status} | {secs} | {limit} | {note} |")
lines.append(f"\ntotal {seconds} s of a {budget} s budget")
bad_tests = 0
for label, path in (("GPU-marked tests (pytest -m gpu tests)", work / "junit-gpu.xml"),
                    ("their CPU twins", work / "junit-cpu.xml")):
    if not path.exists():
        continue
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad_tests += counts["failures"] + counts["errors"]
    lines += ["", f"{label}: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                  f"{counts['skipped']} skipped", ""]
    per_file: dict[str, list[int]] = {}
    problems = []
    for case in root.iter("testcase"):
        module = case.get("classname", "?")
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        tally = per_file.setdefault(module, [0, 0, 0])
        tally[0 if outcome == "passed" else 2 if outcome == "skipped" else 1] += 1
        if outcome in ("failure", "error"):
            problems.append(f"  - {outcome.upper()} {case.get('classname')}::{case.get('name')}")
    lines += ["| module | passed | failed | skipped |", "|---|---|---|---|"]
    lines += [f"| {m} | {p} | {f} | {s} |" for m, (p, f, s) in sorted(per_file.items())]
    lines += problems[:20]
bench = out / "gpu_bench.json"
if bench.exists():
    results = json.loads(bench.read_text())
    s = results["sections"]
    lines += ["", f"Benchmark: {results['device']}, {results['shape']} shape, {results['layers']} layers "
                  f"(full tables: gpu_bench.md)", ""]
    if s.get("decode"):
        lines += ["| batch | reference eager | fused eager | fused + graph | vs reference | of copy BW |",
                  "|---|---|---|---|---|---|"]
        for r in s["decode"]:
            graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.3f} ms"
            frac = "-" if r["copy_fraction"] is None else f"{r['copy_fraction']:.0%}"
            lines.append(f"| {r['batch']} | {r['reference_ms']:.3f} ms | {r['fused_ms']:.3f} ms | {graph} "
                         f"| {r['speedup']:.2f}x | {frac} |")
    if s.get("prefill"):
        lines.append(f"\nprefill: {s['prefill']['tokens']} tokens at {s['prefill']['tokens_per_s']:.0f} tokens/s")
    if s.get("accuracy"):
        a = s["accuracy"]
        lines.append(f"bf16 vs fp32: max abs error {a['max_abs_error']:.4f}, greedy agreement "
                     f"{a['greedy_agreement']:.1%} over {a['tokens']} tokens")
    lines += ["", "| goal | target | measured | status |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | {g['status']} |" for g in results["goals"]]
    lines += [f"\nFAILED bench section {k}: {v}" for k, v in results["errors"].items()]
    lines += [f"\nSKIPPED {v}" for v in results["skipped"]]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print("\n" + text)
sys.exit(1 if bad_tests else 0)
PYTHON

rm -rf "$WORK"
if (( failed )); then
  echo "gpu_check: FAILED (see the table above and the logs in $OUT)"
  exit 1
fi
echo "gpu_check: all stages passed (logs and tables in $OUT)"
