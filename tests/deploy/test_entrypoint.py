"""The containers' start command, run outside Docker exactly as the Dockerfiles and the compose file
write it (same argv, same MEGALODON_* environment), serves /health and a completion.

The only differences from a container are listed in `_server.launch_spec` and checked here to be
nothing more: paths, the loopback address and port, and the device when this machine has no GPU.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.deploy._docker import CPU_DOCKERFILE, GPU_DOCKERFILE
from tests.deploy._server import complete, container_spec
from tests.harness import ServerProcess

# name -> (Dockerfile, compose service or None for a plain `docker run`)
VARIANTS = {
    "docker-run-cpu": (CPU_DOCKERFILE, None),
    "docker-run-gpu": (GPU_DOCKERFILE, None),
    "compose-cpu": (CPU_DOCKERFILE, "megalodon-cpu"),
    "compose-gpu": (GPU_DOCKERFILE, "megalodon"),
}
# Variables that may differ from the container, and why (see `_server.launch_spec`).
ALLOWED_SUBSTITUTIONS = {
    "PATH", "VIRTUAL_ENV",  # /opt/venv -> the environment the package is installed in
    "TORCH_EXTENSIONS_DIR", "MEGALODON_CSRC",  # image layout -> this checkout's kernel cache and csrc/
    "MEGALODON_MODEL",  # the /models volume -> the bundled demo model
    "MEGALODON_API_KEY_FILE",  # /run/secrets -> a file written by the test
    "MEGALODON_HOST", "MEGALODON_PORT",  # loopback and a free port
    "MEGALODON_DEVICE",  # cuda -> cpu, only where there is no GPU
}  # fmt: skip


def probe(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_container_command_serves_health_and_a_completion(variant, compose, demo_model, tmp_path):
    dockerfile, service_name = VARIANTS[variant]
    service = compose["services"][service_name] if service_name else None
    spec = container_spec(dockerfile, service, tmp_path, models_dir=demo_model)
    assert set(spec.substitutions) <= ALLOWED_SUBSTITUTIONS, spec.substitutions
    assert (spec.api_key is not None) == (service is not None), "compose passes the API key as a secret"

    server = ServerProcess.from_command(spec.argv, spec.env, tmp_path / "server.log")
    try:
        server.wait_healthy()
        check = probe(spec.healthcheck, spec.env)
        assert check.returncode == 0, f"the container's healthcheck failed: {check.stderr}"
        if spec.api_key:
            assert httpx.get(server.base_url + "/v1/models", timeout=30).status_code == 401
        body = complete(server.base_url, spec.api_key)
        choice = body["choices"][0]
        assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 8
        if "MEGALODON_SERVED_MODEL_NAME" in spec.env:
            assert body["model"] == spec.env["MEGALODON_SERVED_MODEL_NAME"]
    finally:
        status = server.terminate()
    # `docker stop` sends SIGTERM, then kills after the grace period: the server must exit 0 on its own.
    assert status == 0, f"exit status {status} after SIGTERM:\n{server.log_tail()}"
    assert probe(spec.healthcheck, spec.env).returncode == 1, "the healthcheck must fail with no server"
