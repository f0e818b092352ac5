"""Fixtures for the HTTP tests: one real server process for the session, and clients for it.

The session server runs the real CLI with small limits that the tests rely on: 4 state slots,
6 waiting sequences, max_model_len 2048, an API key, a 0.2 s keep-alive interval and a 256 KiB
request limit. Tests that need their own process (SIGTERM, load failure) start one themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from megalodon_infer.config import DEMO_MODEL_DIR
from tests.harness import ServerProcess, running_server

API_KEYS = ("test-key-one", "test-key-two")
MAX_NUM_SEQS = 4
MAX_WAITING = 6
MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 256 * 1024
SERVER_ARGS = [
    "--max-num-seqs", str(MAX_NUM_SEQS),
    "--max-waiting-requests", str(MAX_WAITING),
    "--max-num-batched-tokens", "256",
    "--max-model-len", str(MAX_MODEL_LEN),
    "--keepalive-interval", "0.2",
    "--max-request-bytes", str(MAX_REQUEST_BYTES),
    "--served-model-name", "test-model",
]  # fmt: skip
MODEL_NAME = "test-model"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled demo model: what `megalodon-serve` serves by default."""
    path = DEMO_MODEL_DIR
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {path}: run scripts/train_demo.py")
    return path


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(model_dir, tmp_path_factory.mktemp("server") / "server.log", SERVER_ARGS,
                        api_keys=API_KEYS) as process:
        yield process


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    """The official client; no retries, so every error status reaches the test."""
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture
async def async_client(server: ServerProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0,
                                  timeout=120) as async_client:
        yield async_client


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """Raw HTTP with the API key."""
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120) as http_client:
        yield http_client


@pytest.fixture(scope="session")
def vocab_size(http: httpx.Client) -> int:
    return http.get("/tokenizer_info").json()["vocab_size"]
