"""The images build the decode kernels in their builder stage and load them in a runtime stage that has
no compiler. Replayed here for the CPU image: its builder command, then its runtime check with only
python and ninja on PATH, using each stage's own ENV from docker/Dockerfile.cpu.

(The CUDA image uses the same scheme plus the CUDA settings that test_dockerfiles.py checks are
repeated verbatim; compiling CUDA needs a CUDA build of torch, which the test machines do not have.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy._docker import CPU_DOCKERFILE, DOCKER_DIR, REPO, parse_dockerfile
from tests.harness import SCRIPTS_DIR


def wrapper(bin_dir: Path, name: str, target: str) -> None:
    # A script, not a symlink: a symlinked interpreter can lose track of its virtual environment.
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    path.chmod(0o755)


def stage_env(stage_env: dict[str, str], layout: dict[str, Path], path: str | None = None) -> dict[str, str]:
    """The stage's ENV with container paths mapped by `layout`; PATH is `path`, or else the stage's own
    PATH with `$PATH` standing for this process's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGALODON_", "TORCH_"))}
    for key, value in stage_env.items():
        for container, host in sorted(layout.items(), key=lambda kv: len(kv[0]), reverse=True):
            value = value.replace(container, str(host))
        env[key] = value.replace("$PATH", os.environ.get("PATH", "")) if key == "PATH" else value
    if path is not None:
        env["PATH"] = path
    return env


def run_stage_command(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    program, script, *args = command.split()
    assert (program, script) == ("python", "/opt/megalodon/build_kernels.py"), command
    executable = shutil.which("python", path=env["PATH"])
    return subprocess.run([executable, str(DOCKER_DIR / "build_kernels.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cpu_kernels_from_the_builder_stage_load_without_a_compiler(tmp_path):
    builder, runtime = parse_dockerfile(CPU_DOCKERFILE)
    ninja = SCRIPTS_DIR / "ninja"  # the images install ninja from PyPI into the venv, as the dev extras do
    if not ninja.is_file():
        pytest.fail(f"ninja is not installed in {SCRIPTS_DIR} (torch's JIT extension loader needs it)")
    image = tmp_path / "image"  # the image's /opt/megalodon
    # /opt/venv/bin: the interpreter running the tests, and its scripts (ninja).
    layout = {"/opt/megalodon": image, "/opt/venv": Path(sys.prefix), "/opt/venv/bin": SCRIPTS_DIR}
    # COPY keeps modification times; ninja compares them with the objects' when it decides to rebuild.
    shutil.copytree(REPO / "csrc", image / "csrc")
    (build_cmd,) = [i.args for i in builder.all("RUN") if "build_kernels.py" in i.args]
    (check_cmd,) = [i.args for i in runtime.all("RUN") if "build_kernels.py" in i.args]

    built = run_stage_command(build_cmd, stage_env(builder.env, layout))  # the builder's PATH: venv, then this one
    assert built.returncode == 0, built.stdout + built.stderr
    assert list((image / "extensions").rglob("*.so")), "the builder stage left no compiled extension"

    runtime_bin = tmp_path / "runtime-bin"  # what the runtime image has on PATH: no c++, no gcc
    runtime_bin.mkdir()
    wrapper(runtime_bin, "python", sys.executable)
    wrapper(runtime_bin, "ninja", str(ninja))
    runtime_env = stage_env(runtime.env, layout, str(runtime_bin))
    loaded = run_stage_command(check_cmd, runtime_env)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr

    # The check can fail: csrc/ at another path changes the compile commands, so ninja wants to
    # rebuild, and with no compiler the runtime stage reports it instead of serving without kernels.
    shutil.copytree(image / "csrc", image / "csrc-moved")
    moved = run_stage_command(check_cmd, {**runtime_env, "MEGALODON_CSRC": str(image / "csrc-moved")})
    assert moved.returncode != 0
    assert "build_kernels:" in moved.stderr
