#!/usr/bin/env bash
# Set up a fresh machine for development and run the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch first: an unpinned torch would pull the multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
python -m ruff check .
lint-imports --no-cache  # layers import downward only (contracts in pyproject.toml)
python -m pytest -q "$@"
