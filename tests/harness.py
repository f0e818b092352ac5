"""The real server as a subprocess, shared by the HTTP tests (tests/server) and the deployment tests
(tests/deploy): start `megalodon-serve` on 127.0.0.1 and a free port, wait for /health, SIGTERM it
and wait for its exit status.

Everything runs from the interpreter that runs the tests, never from a `python` or console script
found on PATH, so the suite passes with its virtual environment not activated: Python is
`sys.executable`, console scripts come from `SCRIPTS_DIR`, and child processes get `SCRIPTS_DIR`
first on PATH (as activating the environment would; torch's extension loader looks `ninja` up there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = Path(sys.executable).parent  # where this environment's console scripts are installed
STARTUP_TIMEOUT_S = 300.0  # a cold start compiles the CPU kernels: ~30 s on 2 idle cores, more when busy
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str, package: str = "megalodon-infer") -> Path:
    """A console script (or a binary a wheel installs beside them) of the environment running the tests."""
    path = SCRIPTS_DIR / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} (PyPI package {package}) is not installed in {SCRIPTS_DIR}; "
                    "install the dev extras: pip install -e '.[dev]'")
    return path


def interpreter_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) without MEGALODON_* settings, with `SCRIPTS_DIR` first
    on PATH."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("MEGALODON_")}
    env["PATH"] = os.pathsep.join(p for p in (str(SCRIPTS_DIR), env.get("PATH", "")) if p)
    return env


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, interval_s: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


class ServerProcess:
    """`megalodon-serve` in a subprocess on 127.0.0.1, started on construction; its output goes to `log_path`.

    `ServerProcess(model_dir, ...)` runs `python -m server.cli` with flags, exactly as a user would start
    it; `ServerProcess.from_command(argv, env, ...)` runs a given command line whose settings are in the
    MEGALODON_* variables of `env` (a container's start command).
    """

    def __init__(self, model_dir: Path, log_path: Path, extra_args: Sequence[str] = (),
                 api_keys: Sequence[str] = ()) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "server.cli", "--model", str(model_dir), "--host", "127.0.0.1",
                "--port", str(port), "--torch-threads", "1", *extra_args]
        if api_keys:
            argv += ["--api-key", ",".join(api_keys)]
        self._start(argv, interpreter_env(), log_path, port=port, api_keys=api_keys, cwd=REPO_ROOT)

    @classmethod
    def from_command(cls, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                     api_keys: Sequence[str] = ()) -> ServerProcess:
        """`argv` with exactly `env`, which must set MEGALODON_HOST=127.0.0.1 and MEGALODON_PORT."""
        assert env.get("MEGALODON_HOST") == "127.0.0.1", "tests only listen on loopback"
        server = cls.__new__(cls)
        server._start(list(argv), dict(env), log_path, port=int(env["MEGALODON_PORT"]), api_keys=api_keys,
                      cwd=log_path.parent)
        return server

    def _start(self, argv: list[str], env: dict[str, str], log_path: Path, *, port: int,
               api_keys: Sequence[str], cwd: Path) -> None:
        self.argv = argv
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_keys = list(api_keys)
        self.api_key = self.api_keys[0] if self.api_keys else None
        self.log_path = log_path
        with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Wait for /health to answer 200; fails the test if the server exits or times out first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode} before it was ready:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.terminate()
        pytest.fail(f"/health did not answer 200 within {timeout_s:.0f} s:\n{self.log_tail()}")

    def terminate(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (as `docker stop` sends), then wait: the exit status, or None if it hung and was killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return None

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as `name{label=value,...}` -> value (labels sorted; the
        `engine` and `model_name` labels left out), parsed by prometheus-client's own parser."""
        text = httpx.get(self.base_url + "/metrics", timeout=10.0).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k not in ("engine", "model_name")}
                key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                                     if labels else "")
                samples[key] = sample.value
        return samples


@contextlib.contextmanager
def running_server(model_dir: Path, log_path: Path, extra_args: Sequence[str] = (),
                   api_keys: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """A healthy `ServerProcess` for the block (what a module-scoped server fixture yields); SIGTERM after."""
    process = ServerProcess(model_dir, log_path, extra_args, api_keys=api_keys)
    try:
        process.wait_healthy()
        yield process
    finally:
        process.terminate()
