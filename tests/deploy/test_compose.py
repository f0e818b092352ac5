"""docker/docker-compose.yml: valid for a real Compose v2, and wired the way docs/deployment.md says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.settings import ServerSettings
from tests.deploy._docker import (
    COMPOSE_FILE,
    CPU_DOCKERFILE,
    DOCKER_DIR,
    GPU_DOCKERFILE,
    json_form,
    parse_dockerfile,
    run_compose,
)

SERVER_SERVICES = {"megalodon": ("gpu", GPU_DOCKERFILE), "megalodon-cpu": ("cpu", CPU_DOCKERFILE)}


def assert_valid(result) -> None:
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"
    # Compose only warns (exit 0) about a ${VAR} with neither a value nor a default.
    assert "variable is not set" not in result.stderr, result.stderr


def test_compose_file_validates_with_defaults_only(compose_bin, empty_env_file):
    assert_valid(run_compose(compose_bin, "config", "--quiet", env_file=empty_env_file))


def test_compose_file_validates_with_the_example_env_file(compose_bin):
    assert_valid(run_compose(compose_bin, "config", "--quiet", env_file=DOCKER_DIR / ".env.example"))


def test_compose_binary_rejects_an_invalid_file(compose_bin, empty_env_file, tmp_path):
    """The check above can fail: the same call on a file with a misspelt key exits non-zero."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    broken.write_text(text.replace("    profiles: [gpu]\n", "    profiles: [gpu]\n    gpus_count: 1\n"))
    result = run_compose(compose_bin, "config", "--quiet", env_file=empty_env_file, compose_files=(broken,),
                         cwd=tmp_path)
    assert result.returncode != 0
    assert "gpus_count" in result.stderr


def test_gpu_service_reserves_a_gpu_and_mounts_the_checkpoint_read_only(compose):
    service = compose["services"]["megalodon"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]
    (volume,) = service["volumes"]
    assert (volume["type"], volume["target"], volume["read_only"]) == ("bind", "/models", True)
    # A missing checkpoint folder must be an error, not an empty folder that Docker creates.
    assert not volume["bind"].get("create_host_path", False)
    assert service["environment"]["MEGALODON_MODEL"] == "/models"
    assert service["environment"]["MEGALODON_DEVICE"] == "cuda"


def test_cpu_service_serves_the_demo_model_with_no_volume_and_no_gpu(compose):
    service = compose["services"]["megalodon-cpu"]
    assert not service.get("volumes")
    assert "devices" not in str(service.get("deploy", {}))
    assert "MEGALODON_MODEL" not in service["environment"]
    assert "MEGALODON_MODEL" not in parse_dockerfile(CPU_DOCKERFILE)[-1].env


@pytest.mark.parametrize("name", sorted(SERVER_SERVICES))
def test_server_services_profile_image_and_ports(compose, name):
    profile, dockerfile = SERVER_SERVICES[name]
    service = compose["services"][name]
    assert service["profiles"] == [profile]
    assert Path(service["build"]["context"]) / service["build"]["dockerfile"] == dockerfile
    image_env = parse_dockerfile(dockerfile)[-1].env
    assert [p["target"] for p in service["ports"]] == [int(image_env["MEGALODON_PORT"])]
    assert service["networks"]["default"]["aliases"] == ["megalodon-server"]


def seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, duration
    hours, minutes, secs = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + secs


@pytest.mark.parametrize("name", sorted(SERVER_SERVICES))
def test_docker_waits_for_the_server_to_drain_before_killing_it(compose, name):
    drain = ServerSettings.model_fields["drain_timeout"].default
    env_drain = compose["services"][name]["environment"].get("MEGALODON_DRAIN_TIMEOUT")
    drain = float(env_drain) if env_drain is not None else drain
    # Draining is followed by stopping the engine: leave it some seconds of its own.
    assert seconds(compose["services"][name]["stop_grace_period"]) >= drain + 10


@pytest.mark.parametrize("name", sorted(SERVER_SERVICES))
def test_server_healthcheck_is_the_images_own(compose, name):
    _, dockerfile = SERVER_SERVICES[name]
    image_check = json_form(parse_dockerfile(dockerfile)[-1].one("HEALTHCHECK"))
    assert compose["services"][name]["healthcheck"]["test"] == ["CMD", *image_check]


def test_every_service_restarts_and_has_a_healthcheck(compose):
    assert set(compose["services"]) == {"megalodon", "megalodon-cpu", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck", {})
        assert check.get("test", [""])[0] == "CMD" and check.get("retries", 0) >= 1, name
    assert compose["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(SERVER_SERVICES))
def test_api_key_is_a_secret_file_not_an_env_value(compose, name):
    service = compose["services"][name]
    (secret,) = service["secrets"]
    assert service["environment"]["MEGALODON_API_KEY_FILE"] == secret["target"]
    assert "MEGALODON_API_KEY" not in service["environment"]
    source = Path(compose["secrets"][secret["source"]]["file"])
    assert source.parent == DOCKER_DIR / "secrets"
    # The folder keeps real keys out of git: only the .gitignore itself and *.example are tracked.
    rules = (source.parent / ".gitignore").read_text().split()
    assert "*" in rules and not any(r.startswith("!") and source.name.startswith(r[1:]) for r in rules)


@pytest.mark.parametrize("dockerfile", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_no_api_key_is_baked_into_an_image(dockerfile):
    for stage in parse_dockerfile(dockerfile):
        for instruction in stage.instructions:
            if instruction.keyword in ("ENV", "ARG", "LABEL"):
                assert "API_KEY" not in instruction.args, f"{dockerfile.name}:{instruction.line}"


def test_monitoring_mounts_files_that_exist(compose):
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name} mounts missing {volume['source']}"
                assert volume.get("read_only"), f"{name} should mount {volume['source']} read-only"
    published = {p["host_ip"] for n in ("prometheus", "grafana") for p in compose["services"][n]["ports"]}
    assert published == {"127.0.0.1"}, "Prometheus and Grafana have no auth of their own: loopback only"
