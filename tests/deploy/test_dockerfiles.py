"""docker/Dockerfile (CUDA) and docker/Dockerfile.cpu: lint-clean, and built the way the images need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from server.settings import ServerSettings
from tests.deploy._docker import (
    CPU_DOCKERFILE,
    GPU_DOCKERFILE,
    REPO,
    Stage,
    build_context_files,
    context_copy_sources,
    json_form,
    parse_dockerfile,
)

DOCKERFILES = [GPU_DOCKERFILE, CPU_DOCKERFILE]
by_name = pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)


def hadolint(binary: Path, dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Run from an empty folder with HOME there too, so no personal .hadolint.yaml relaxes the rules.
    env = {"HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(binary), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


@by_name
def test_hadolint_finds_nothing(hadolint_bin, dockerfile, tmp_path):
    result = hadolint(hadolint_bin, dockerfile, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(hadolint_bin, tmp_path):
    """The check above can fail: an untagged base image and `cd` in RUN are reported, exit non-zero."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && touch x\n")
    result = hadolint(hadolint_bin, bad, tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3003" in result.stdout


@by_name
def test_every_hadolint_ignore_is_justified_on_the_line_above(dockerfile):
    lines = dockerfile.read_text().splitlines()
    pragmas = [n for n, line in enumerate(lines) if re.match(r"#\s*hadolint\s+ignore=", line)]
    for n in pragmas:
        above = lines[n - 1].strip() if n else ""
        assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
            f"{dockerfile.name}:{n + 1}: explain why the rule is ignored in a comment right above it")


def stages(dockerfile: Path) -> tuple[Stage, Stage]:
    parsed = parse_dockerfile(dockerfile)
    assert [s.name for s in parsed] == ["builder", "runtime"]
    return parsed[0], parsed[1]


def run_lines(stage: Stage) -> list[str]:
    return [i.args for i in stage.all("RUN")]


def test_gpu_image_compiles_on_cuda_devel_and_serves_on_cuda_runtime():
    builder, runtime = stages(GPU_DOCKERFILE)
    devel = re.fullmatch(r"nvidia/cuda:([\d.]+)-devel-(ubuntu[\d.]+)", builder.image)
    served = re.fullmatch(r"nvidia/cuda:([\d.]+)-runtime-(ubuntu[\d.]+)", runtime.image)
    assert devel and served and devel.groups() == served.groups(), (builder.image, runtime.image)
    assert "python /opt/megalodon/build_kernels.py --cuda" in run_lines(builder)
    assert "python /opt/megalodon/build_kernels.py --cuda --expect-prebuilt" in run_lines(runtime)
    assert runtime.one("VOLUME").args == '["/models"]'
    assert runtime.env["MEGALODON_MODEL"] == "/models"
    assert runtime.env["MEGALODON_DEVICE"] == "cuda"


def test_cpu_image_uses_the_official_cpu_wheels_and_bundles_no_volume():
    builder, runtime = stages(CPU_DOCKERFILE)
    assert builder.image == runtime.image and builder.image.startswith("python:")
    assert any("--index-url https://download.pytorch.org/whl/cpu" in line for line in run_lines(builder))
    assert "python /opt/megalodon/build_kernels.py" in run_lines(builder)
    assert "python /opt/megalodon/build_kernels.py --expect-prebuilt" in run_lines(runtime)
    assert not runtime.all("VOLUME")
    assert runtime.env["MEGALODON_DEVICE"] == "cpu"


@by_name
def test_builder_settings_are_repeated_verbatim_in_the_runtime_stage(dockerfile):
    """The JIT loader re-runs ninja at every start; it is a no-op only if paths and flags match."""
    builder, runtime = stages(dockerfile)
    assert builder.env, "the builder stage sets the kernel build environment"
    drift = {k: (v, runtime.env.get(k)) for k, v in builder.env.items() if runtime.env.get(k) != v}
    assert not drift, f"builder vs runtime: {drift}"


@by_name
def test_runtime_runs_as_a_numeric_non_root_user_with_the_plain_cli(dockerfile):
    _, runtime = stages(dockerfile)
    keywords = [i.keyword for i in runtime.instructions]
    user = runtime.one("USER").args
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    # The prebuilt-kernel check runs as that user, since the server will too.
    assert keywords.index("USER") < max(n for n, i in enumerate(runtime.instructions)
                                         if i.keyword == "RUN" and "--expect-prebuilt" in i.args)
    assert json_form(runtime.one("ENTRYPOINT")) == ["megalodon-serve"]
    assert json_form(runtime.one("CMD")) == []
    check = json_form(runtime.one("HEALTHCHECK"))
    assert check == ["/opt/venv/bin/python", "/opt/megalodon/healthcheck.py"]


@by_name
def test_server_settings_in_the_image_are_real_flags(dockerfile):
    """Every MEGALODON_* variable is a megalodon-serve setting, or one the kernels package reads."""
    _, runtime = stages(dockerfile)
    settings = {"MEGALODON_" + name.upper() for name in ServerSettings.model_fields}
    kernels = "".join(p.read_text() for p in (REPO / "megalodon_infer" / "kernels").glob("*.py"))
    for key in runtime.env:
        if key.startswith("MEGALODON_"):
            assert key in settings or f'"{key}"' in kernels, f"{dockerfile.name}: nothing reads {key}"


def test_build_context_is_the_allow_list_and_has_what_the_dockerfiles_copy():
    files = build_context_files()
    top_level = {f.split("/")[0] for f in files}
    assert top_level <= {"pyproject.toml", "README.md", "megalodon_infer", "server", "megalodon_cluster", "csrc",
                         "docker"}
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".so"))]
    for dockerfile in DOCKERFILES:
        for source in context_copy_sources(stages(dockerfile)[0]) + context_copy_sources(stages(dockerfile)[1]):
            assert any(f == source or f.startswith(source + "/") for f in files), (
                f"{dockerfile.name} copies {source}, which .dockerignore leaves out")
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 100 * 2**20, f"build context is {size / 2**20:.0f} MiB"
