"""Run a container's command line outside Docker: its environment, with container paths mapped to
this checkout and the environment running the tests. The process itself is tests/harness.py's
`ServerProcess.from_command`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex

import httpx
import pytest
import torch

from megalodon_infer.kernels.build import build_root
from tests.deploy._docker import DOCKER_DIR, REPO, json_form, parse_dockerfile
from tests.harness import SCRIPTS_DIR, free_port


def container_paths(*, extensions_dir: Path, models_dir: Path, secrets_dir: Path) -> dict[str, str]:
    """Container paths -> where the same thing is outside a container, for this checkout.

    Any other absolute container path in an image's environment fails the test (`map_value`): a new
    one must be added here.
    """
    return {
        "/opt/venv": sys.prefix,  # the Python environment megalodon-serve is installed in
        "/opt/venv/bin": str(SCRIPTS_DIR),  # its interpreter and console scripts
        "/opt/megalodon/csrc": str(REPO / "csrc"),
        "/opt/megalodon/extensions": str(extensions_dir),
        "/opt/megalodon": str(DOCKER_DIR),  # build_kernels.py and healthcheck.py
        "/models": str(models_dir),
        "/run/secrets": str(secrets_dir),
    }


# Absolute paths that are passed through unchanged, and why that is harmless here.
PASSTHROUGH_PATHS = {
    "/usr/local/cuda": "CUDA_HOME is only read when compiling CUDA kernels, which a CPU torch never does",
}


def map_value(value: str, mapping: dict[str, str]) -> str:
    """Map each ':'-separated part of `value` that is a container path; `$PATH` becomes this PATH."""
    parts = []
    for part in value.split(":"):
        if part == "$PATH":
            parts.append(os.environ.get("PATH", ""))
            continue
        if part.startswith("/") and part not in PASSTHROUGH_PATHS:
            prefix = next((p for p in sorted(mapping, key=len, reverse=True)
                           if part == p or part.startswith(p + "/")), None)
            if prefix is None:
                pytest.fail(f"container path {part!r} has no counterpart outside the container; "
                            "add it to tests/deploy/_server.py:container_paths")
            part = mapping[prefix] + part[len(prefix):]
        parts.append(part)
    return ":".join(parts)


def map_argv(argv: list[str], mapping: dict[str, str], path: str) -> list[str]:
    """The container argv with paths mapped and the program resolved on `path`, as the image's PATH would."""
    argv = [map_value(arg, mapping) if arg.startswith("/") else arg for arg in argv]
    program = shutil.which(argv[0], path=path)
    if program is None:
        pytest.fail(f"{argv[0]!r} is not on the image's PATH ({path}); install the package: pip install -e '.[dev]'")
    return [program, *argv[1:]]


def complete(base_url: str, api_key: str | None, prompt: str = "def add(a, b):", stream: bool = False) -> dict:
    """One /v1/completions request for the first model /v1/models lists; returns the JSON body
    (for a stream: the last chunk with choices, plus `text` joined over all chunks)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
        body = {"model": models.json()["data"][0]["id"], "prompt": prompt, "max_tokens": 8,
                "temperature": 0, "stream": stream}
        if not stream:
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()
        text, last = "", None
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    if chunk.get("choices"):
                        text += chunk["choices"][0].get("text", "")
                        last = chunk
        assert last is not None, "the stream carried no choices"
        return {**last, "text": text}


@dataclass
class LaunchSpec:
    """A container's start command as written in a Dockerfile (and compose service), made runnable here."""

    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str]
    api_key: str | None
    substitutions: dict[str, tuple[str, str]]  # variable -> (container value, value used here)


def launch_spec(image_env: dict[str, str], entrypoint: list[str], cmd: list[str], healthcheck: list[str], *,
                mapping: dict[str, str], secrets: dict[str, str], port: int, has_gpu: bool) -> LaunchSpec:
    """Apply the only differences between a container and this machine, each recorded in `substitutions`:

    - container paths -> this checkout (`mapping`), and secret files written where /run/secrets maps to;
    - MEGALODON_HOST -> 127.0.0.1 (a test listens on loopback only) and MEGALODON_PORT -> a free port
      (a container has a network namespace of its own);
    - MEGALODON_DEVICE cuda -> cpu when this machine has no GPU.
    Everything else (the rest of the MEGALODON_* settings, the argv) is used exactly as written.
    """
    secrets_dir = Path(mapping["/run/secrets"])
    for name, value in secrets.items():
        (secrets_dir / name).write_text(value + "\n")
    overrides = {"MEGALODON_HOST": "127.0.0.1", "MEGALODON_PORT": str(port)}
    if not has_gpu and image_env.get("MEGALODON_DEVICE", "").startswith("cuda"):
        overrides["MEGALODON_DEVICE"] = "cpu"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGALODON_")}
    substitutions = {}
    for key, value in image_env.items():
        used = overrides.get(key, map_value(value, mapping))
        if used != value:
            substitutions[key] = (value, used)
        env[key] = used
    for key, value in overrides.items():
        env.setdefault(key, value)
    argv = map_argv(entrypoint + cmd, mapping, env["PATH"])
    return LaunchSpec(argv, env, map_argv(healthcheck, mapping, env["PATH"]),
                      next(iter(secrets.values()), None), substitutions)


def container_spec(dockerfile: Path, service: dict | None, workdir: Path, *, models_dir: Path,
                   secret_value: str | None = None) -> LaunchSpec:
    """How the image built from `dockerfile` starts, optionally as compose `service` runs it (whose
    environment, entrypoint, command, healthcheck and secrets override the image's, as Docker does).
    Secret files get `secret_value`, or a fresh random key."""
    runtime = parse_dockerfile(dockerfile)[-1]
    env = dict(runtime.env)
    entrypoint, cmd = json_form(runtime.one("ENTRYPOINT")), json_form(runtime.one("CMD"))
    healthcheck = json_form(runtime.one("HEALTHCHECK"))
    secrets: dict[str, str] = {}
    if service is not None:
        env.update({k: v for k, v in (service.get("environment") or {}).items() if v is not None})
        if service.get("entrypoint") is not None:  # a compose entrypoint also drops the image's CMD
            entrypoint, cmd = service["entrypoint"], service.get("command") or []
        elif service.get("command") is not None:
            cmd = service["command"]
        if service.get("healthcheck"):
            kind, *healthcheck = service["healthcheck"]["test"]
            assert kind == "CMD", "only exec-form healthchecks can be run outside a shell-less image"
        value = secret_value or "sk-test-" + token_hex(12)
        secrets = {Path(s["target"]).name: value for s in service.get("secrets", [])}
    secrets_dir = workdir / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    mapping = container_paths(extensions_dir=build_root(), models_dir=models_dir, secrets_dir=secrets_dir)
    return launch_spec(env, entrypoint, cmd, healthcheck, mapping=mapping, secrets=secrets, port=free_port(),
                       has_gpu=torch.cuda.is_available())
