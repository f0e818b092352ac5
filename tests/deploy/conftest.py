"""Fixtures for the deployment tests: the pinned tools and the compose file as Compose resolves it."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalodon_infer.config import DEMO_MODEL_DIR
from tests.deploy._docker import compose_binary, compose_config, hadolint_binary


@pytest.fixture(scope="session")
def compose_bin() -> Path:
    return compose_binary()


@pytest.fixture(scope="session")
def hadolint_bin() -> Path:
    return hadolint_binary()


@pytest.fixture(scope="session")
def empty_env_file(tmp_path_factory) -> Path:
    """An empty compose env file: every ${...} falls back to the default written in the compose file."""
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="session")
def compose(compose_bin, empty_env_file) -> dict:
    return compose_config(compose_bin, empty_env_file)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The bundled demo model: what the CPU image serves, and what the GPU variants mount as /models."""
    path = DEMO_MODEL_DIR
    if not (path / "config.json").is_file():
        pytest.fail(f"the bundled demo model is missing at {path} (scripts/train_demo.py creates it)")
    return path
