"""`megalodon-serve` as a subprocess for the benchmarks that time the HTTP path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class Server:
    """The real CLI on 127.0.0.1 and a free port, with `args`; its log goes to `log_path`. `module` is
    the CLI (`megalodon_cluster.cli` for megalodon-serve-cluster)."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 module: str = "server.cli") -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        clean = {k: v for k, v in (env or os.environ).items() if not k.startswith("MEGALODON_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=REPO, env=clean, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"megalodon-serve exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("megalodon-serve did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
