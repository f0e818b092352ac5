"""docs/deployment.md and the example env files name only files and variables that exist."""

from __future__ import annotations

import re
from pathlib import Path

from server.settings import ServerSettings
from tests.deploy._docker import COMPOSE_FILE, DOCKER_DIR, REPO

DOCS = REPO / "docs" / "deployment.md"
SETTINGS = {"MEGALODON_" + name.upper() for name in ServerSettings.model_fields}
KERNEL_VARS = set(re.findall(r'"(MEGALODON_[A-Z_]+)"', "".join(
    p.read_text() for p in (REPO / "megalodon_infer" / "kernels").glob("*.py"))))
# Variables Compose itself reads from docker/.env.
COMPOSE_OWN = {"COMPOSE_PROFILES"}


def interpolated() -> set[str]:
    """The ${NAME...} variables the compose files substitute."""
    text = COMPOSE_FILE.read_text()
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))


def env_keys(path: Path) -> list[str]:
    return [line.split("=", 1)[0] for line in path.read_text().splitlines() if line and not line.startswith("#")]


def exists(path: Path) -> bool:
    """A file the reader creates from an example (docker/.env, the key) counts through its example."""
    return path.exists() or path.with_name(path.name + ".example").exists()


def test_server_env_example_sets_only_server_settings():
    keys = env_keys(DOCKER_DIR / "megalodon.env.example")
    assert keys and set(keys) <= SETTINGS, set(keys) - SETTINGS


def test_compose_env_example_sets_only_what_compose_substitutes():
    keys = set(env_keys(DOCKER_DIR / ".env.example"))
    assert keys <= interpolated() | COMPOSE_OWN, keys - interpolated() - COMPOSE_OWN
    assert interpolated() <= keys, f"undocumented in .env.example: {interpolated() - keys}"


def test_docs_name_real_variables_and_files():
    text = DOCS.read_text()
    known = SETTINGS | KERNEL_VARS | interpolated()
    unknown = {v for v in re.findall(r"\b(MEGALODON_[A-Z_]+)\b", text) if v not in known}
    assert not unknown, unknown
    paths = set(re.findall(r"`((?:docker|server|tests|deploy|megalodon_cluster)/[\w./-]*)`", text))
    assert paths and not [p for p in paths if not exists(REPO / p)], paths
    local = set(re.findall(r"`((?:secrets)/[\w./-]+|docker-compose[\w.]*\.yml|\.env\.example)`", text))
    assert local and not [p for p in local if not exists(DOCKER_DIR / p)], local
