"""deploy/kuberay/rayservice.yaml and deploy/serve_config.yaml, validated offline: the RayService
against KubeRay's CRD schema (v1.7, ray.io/v1, unknown fields refused as `kubectl --validate=strict`
does), its serveConfigV2 and the Serve config file against Ray Serve's own schema, and both against
the application they name."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from megalodon_cluster.app import ClusterOptions, build
from server.settings import ServerSettings
from tests.deploy._docker import GPU_DOCKERFILE, REPO, parse_dockerfile

MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
# KubeRay v1.7.0's helm-chart/kuberay-operator/crds/ray.io_rayservices.yaml, version v1's
# openAPIV3Schema (Apache-2.0), as compact JSON.
CRD_SCHEMA = REPO / "tests" / "data" / "kuberay" / "rayservice-v1.schema.json"


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever Kubernetes would prune or reject them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_rayservice_validates_against_kuberays_schema(validator, manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert errors(validator, manifest) == []


@pytest.mark.parametrize("break_it", [
    lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParam={}),  # a typo
    lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="four"),
    lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
])
def test_a_broken_rayservice_does_not(validator, manifest, break_it):
    broken = copy.deepcopy(manifest)
    break_it(broken)
    assert errors(validator, broken)


def serve_configs(manifest: dict) -> list[ServeDeploySchema]:
    return [ServeDeploySchema(**yaml.safe_load(manifest["spec"]["serveConfigV2"])),
            ServeDeploySchema(**yaml.safe_load(SERVE_CONFIG.read_text()))]


def test_serve_configs_validate_and_build_the_application(manifest, tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text("sk-test\n")
    known = set(ServerSettings.model_fields) | set(ClusterOptions.model_fields)
    for config in serve_configs(manifest):
        (app,) = config.applications
        assert app.import_path == "megalodon_cluster.app:build" and app.route_prefix == "/"
        assert set(app.args) <= known, set(app.args) - known
        args = {**app.args, **({"api_key_file": str(key_file)} if "api_key_file" in app.args else {})}
        assert build(args) is not None


def test_the_pods_match_the_application(manifest):
    spec = manifest["spec"]["rayClusterConfig"]
    assert f'"ray[serve]=={spec["rayVersion"]}"' in (REPO / "pyproject.toml").read_text()  # the [ray] extra's pin
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": config["http_options"]["port"], "name": "serve"} in head["ports"]
    workers = spec["workerGroupSpecs"][0]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert args["replica_gpus"] == gpus and args["replicas"] <= workers["replicas"] * gpus
    for group in (spec["headGroupSpec"], workers):
        pod = group["template"]["spec"]
        port = group["rayStartParams"]["metrics-export-port"]
        assert {"containerPort": int(port), "name": "metrics"} in pod["containers"][0]["ports"]
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert args["model"] in mounts and mounts[args["model"]]["readOnly"]
        assert args["state_store_dir"] in mounts and not mounts[args["state_store_dir"]].get("readOnly")
        assert Path(args["api_key_file"]).parent.as_posix() in mounts
    # the image the manifest names is docker/Dockerfile built with the Ray extra
    assert "--build-arg EXTRAS='[ray]'" in MANIFEST.read_text()
    runtime_args = [i.args for stage in parse_dockerfile(GPU_DOCKERFILE) for i in stage.instructions
                    if i.keyword == "ARG"]
    assert any(re.match(r"EXTRAS=", a) for a in runtime_args), runtime_args
