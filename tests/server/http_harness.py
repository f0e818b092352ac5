"""Helpers for the HTTP tests: a model directory to serve, and the real CLI as a subprocess.

`ServerProcess` runs `python -m server.cli` on 127.0.0.1 and a free port, exactly as a user would
start it, and waits for `/health`. The model is the bundled demo model when it is installed,
otherwise a tiny random Megalodon with a SentencePiece tokenizer trained here on CPython's own
standard library (nothing is downloaded).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`megalodon-serve` in a subprocess on 127.0.0.1; its log goes to `log_path`."""

    def __init__(self, model_dir: Path, log_path: Path, extra_args: Sequence[str] = (),
                 api_keys: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_keys = list(api_keys)
        self.api_key = self.api_keys[0] if self.api_keys else None
        self.log_path = log_path
        args = [sys.executable, "-m", "server.cli", "--model", str(model_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--torch-threads", "1", *extra_args]
        if self.api_keys:
            args += ["--api-key", ",".join(self.api_keys)]
        env = {key: value for key, value in os.environ.items() if not key.startswith("MEGALODON_")}
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log_text()}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL only if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._log.close()

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


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
