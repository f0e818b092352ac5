#!/usr/bin/env bash
# Set up a fresh machine for development and run the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch first: an unpinned torch would pull the multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# The ray extra too: tests/cluster runs a local Ray cluster (ray[serve] adds ~40 s and ~330 MB).
python -m pip install -q -e '.[dev,ray]'
python -m ruff check .
lint-imports --no-cache  # layers import downward only (contracts in pyproject.toml)
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast loop (README, Development).
python -m pytest -q "$@"
