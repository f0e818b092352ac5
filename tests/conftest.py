"""Shared fixtures: tiny random Megalodons built in-process (nothing downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "parity_small"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (FIXTURE_DIR / "config.json").exists():
        raise FileNotFoundError(f"parity fixtures not found at {FIXTURE_DIR}; the suite needs ../shared/fixtures")
    return FIXTURE_DIR
