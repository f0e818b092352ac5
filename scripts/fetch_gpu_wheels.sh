#!/usr/bin/env bash
# Download, on the dev machine, the wheels scripts/gpu_check.sh needs on the GPU machine (Python 3.12,
# no package registry there): pydantic and its dependencies, into .whl/ (git-ignored). Carry `.whl`
# with the device run; gpu_check.sh installs them when pydantic is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
for spec in pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
            typing-extensions==4.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
ls -l .whl
