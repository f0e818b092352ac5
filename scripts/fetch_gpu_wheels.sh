#!/usr/bin/env bash
# Download, on this (dev) machine, the Python wheels scripts/gpu_check.sh needs on the GPU machine, where
# no package registry can be reached (Python 3.12 there). The roots are what the repo imports there and the
# GPU image lacks: the server's stack (pydantic, pydantic-settings, fastapi, uvicorn + httptools, llguidance), the official openai
# client that the end-to-end test drives, and dockerfile-parse (tests/deploy imports it when pytest collects).
# Their requirements are followed through this environment's installed metadata (markers evaluated for
# CPython 3.12 on Linux, no extras), and each package needed is taken at the version installed here (the
# one the suite runs against): into .whl/ when the image lacks it, into .whl/fallback/ when the image has it
# but a carried wheel constrains its version (the image's versions are not known here: gpu_check.sh
# installs a fallback only where the image's own version does not satisfy the carried wheels).
#
# Afterwards every requirement of every downloaded wheel is checked, from the wheels themselves, to be
# carried or on the image (exit 1 if not); the image's package list (KINDS.md, read 2026-11-17: below) is
# written to .whl/gpu_machine_packages.txt for gpu_check.sh's dry run; the total size is printed (it
# travels with the working tree, 64 MiB in all, the repo included). .whl/ is ignored through
# .git/info/exclude (and .gitignore), never committed.
#
# Usage: bash scripts/fetch_gpu_wheels.sh       then carry `.whl` in the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# What the repo imports on the GPU machine and its image lacks; their requirements are found below.
ROOTS=(pydantic pydantic-settings fastapi uvicorn httptools openai dockerfile-parse llguidance)
# The GPU image's packages (KINDS.md, "Python packages already there", 2026-11-17).
PREINSTALLED="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl/fallback
tr -s ' \n' '\n' <<<"$PREINSTALLED" | sed '/^$/d' > .whl/gpu_machine_packages.txt

# "carry NAME==VERSION" and "fallback NAME==VERSION" lines: the roots' requirement closure in this environment
plan=$("$PY" - "${ROOTS[@]}" <<'PYTHON'
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "os_name": "posix", "platform_machine": "x86_64", "extra": ""}
image = {canonicalize_name(n) for n in Path(".whl/gpu_machine_packages.txt").read_text().split()}
carry, fallback, todo = {}, {}, [canonicalize_name(r) for r in sys.argv[1:]]
while todo:
    name = todo.pop()
    if name in carry:
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        sys.exit(f"FAIL: {name} is not installed here: install the dev extras (pip install -e '.[dev]') first")
    carry[name] = dist.version
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue  # an extra, or another platform or Python
        dep = canonicalize_name(req.name)
        if dep in image:
            if req.specifier:
                fallback[dep] = distribution(dep).version
        else:
            todo.append(dep)
for kind, found in (("carry", carry), ("fallback", fallback)):
    for name, ver in sorted(found.items()):
        print(f"{kind} {name}=={ver}")
PYTHON
)
mapfile -t specs < <(sed -n 's/^carry //p' <<<"$plan")
mapfile -t fallbacks < <(sed -n 's/^fallback //p' <<<"$plan")

# keep one version of each (two stop the install there): drop wheels that are not of the wanted set
"$PY" - "${specs[@]}" -- "${fallbacks[@]}" <<'PYTHON'
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

split = sys.argv.index("--")
for folder, specs in ((".whl", sys.argv[1:split]), (".whl/fallback", sys.argv[split + 1:])):
    wanted = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in specs}
    for wheel in Path(folder).glob("*.whl"):
        name, ver, _, _ = parse_wheel_filename(wheel.name)
        if wanted.get(name) != str(ver):
            print(f"removing {wheel} (not in the wanted set)")
            wheel.unlink()
PYTHON

platforms=()
# NOTE: glibc there is not on record; its Python 3.12.3 is Ubuntu 24.04's (glibc 2.39), so wheels up to
# manylinux_2_39 are taken (llguidance ships only manylinux_2_31). gpu_check.sh's setup stage fails loudly
# if pip there refuses one.
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
download() {  # FOLDER SPEC...
  local folder=$1
  shift
  # pip's local-mirror configuration warns once per missing index folder: keep the output readable
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$folder" "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
echo "== carried (not on the GPU image): ${specs[*]}"
download .whl "${specs[@]}"
echo "== fallbacks (on the image, versions constrained by carried wheels): ${fallbacks[*]}"
download .whl/fallback "${fallbacks[@]}"

echo "== requirements of the downloaded wheels (CPython 3.12, Linux x86-64)"
"$PY" - <<'PYTHON'
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "os_name": "posix", "platform_machine": "x86_64", "extra": ""}
carried, fallback = {}, {}
for folder, found in ((".whl", carried), (".whl/fallback", fallback)):
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, ver, _, _ = parse_wheel_filename(wheel.name)
        if name in found:
            sys.exit(f"FAIL: two versions of {name} in {folder}")
        found[name] = (ver, wheel)
image = {canonicalize_name(n) for n in Path(".whl/gpu_machine_packages.txt").read_text().split()}
problems = [f"{n} is on the GPU image already: it belongs in .whl/fallback" for n in carried.keys() & image]
problems += [f"{n} is not on the GPU image: it belongs in .whl" for n in fallback.keys() - image]
on_image: dict[str, set[str]] = {}
for name, (ver, wheel) in {**fallback, **carried}.items():
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue  # an extra, or another platform or Python
        dep = canonicalize_name(req.name)
        if dep in carried:
            if not req.specifier.contains(carried[dep][0], prereleases=True):
                problems.append(f"{name} {ver} needs {req}, but {dep} {carried[dep][0]} is carried")
        elif dep in image:
            if name in carried:
                on_image.setdefault(dep, set()).add(f"{req.specifier or 'any'} (for {name})")
            if dep in fallback and not req.specifier.contains(fallback[dep][0], prereleases=True):
                problems.append(f"{name} {ver} needs {req}, but the fallback is {dep} {fallback[dep][0]}")
            elif req.specifier and dep not in fallback and name in carried:
                problems.append(f"{name} {ver} needs {req}: on the image, with no fallback wheel")
        else:
            problems.append(f"{name} {ver} needs {req}: neither carried nor on the GPU image")
for dep, needs in sorted(on_image.items()):
    print(f"   on the image: {dep} {', '.join(sorted(needs))}")
if problems:
    sys.exit("FAIL:\n  " + "\n  ".join(problems))
print(f"   ok   {len(carried)} carried and {len(fallback)} fallback wheels: every requirement is carried or on the "
      "image (a fallback is installed there only where the image's version does not satisfy it)")
PYTHON

total=$(find .whl -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
find .whl -type f -name '*.whl' -printf '%8k KiB  %p\n' | sort -k3
echo "== total $((total / 1024)) KiB in $(find .whl -type f -name '*.whl' | wc -l) wheels (they travel with the working tree: 64 MiB in all)"
if (( total > 24 << 20 )); then
  echo "FAIL: the wheels take over 24 MiB"
  exit 1
fi
