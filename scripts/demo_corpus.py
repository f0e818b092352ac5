"""The demo model's text: CPython's standard library plus pinned pure-Python packages from PyPI.

    python scripts/demo_corpus.py --cache ~/.cache/megalodon-demo    # download and print the split

Three disjoint sets of files, each a list of `SourceFile`:

- training: the interpreter's stdlib and the wheels pinned in `demo_packages.txt`, minus
- validation: whole packages (a stdlib top-level module counts as a package) chosen by a hash of
  their name, never single files of a package that also trains, and
- evaluation: pip, setuptools and wheel (pinned in `EVAL_PACKAGES`). They sit in every Python
  environment, so they are never trained on; their vendored copies of other projects and
  setuptools' copy of distutils are left out of the evaluation text, since those are (or may be)
  training text.

Files are deduplicated by content (whitespace-stripped lines), first by evaluation text, then
validation, then training, so no text can be in two sets. Test suites, generated tables and
files with data-sized lines are left out everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES_FILE = Path(__file__).resolve().with_name("demo_packages.txt")
EVAL_PACKAGES = ("pip==24.2", "setuptools==75.1.0", "wheel==0.44.0")
# Never trained on, whether as their own wheels or inside another project.
EVAL_NAMES = frozenset({"pip", "setuptools", "wheel"})
SKIPPED_DIRS = frozenset({"test", "tests", "testing", "idle_test", "site-packages", "encodings", "pydoc_data",
                          "_vendor", "vendor", "vendored", "_distutils", "ensurepip"})
MAX_FILE_BYTES = 200_000  # larger .py files are generated tables (unicode data, parser tables)
MAX_LINE_CHARS = 400  # a longer line is data (base64 blobs, lookup tables), not code
MAX_PACKAGE_BYTES = 2_000_000  # so sympy or Django cannot crowd out a hundred small packages
VALIDATION_MODULUS = 25  # a package validates when sha256(name) % 25 == 0 (~4%)


@dataclass(frozen=True)
class SourceFile:
    package: str  # distribution name ("requests"), or "stdlib/<top-level module>"
    path: str  # path inside the wheel or the stdlib
    text: str


def pinned_packages(path: Path = PACKAGES_FILE) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_key(wheel: Path) -> tuple[str, str]:
    """(normalized distribution name, version) from a wheel's file name."""
    name, version = wheel.name.split("-")[:2]
    return _normalize(name), version


def download(requirements: list[str], dest: Path) -> list[Path]:
    """The wheel of each pinned requirement (pure-Python only: no build, no install, no deps)."""
    dest.mkdir(parents=True, exist_ok=True)
    req_file = dest / "requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--platform", "any", "--python-version", "3.11", "--implementation", "py",
                    "--dest", str(dest), "-r", str(req_file)], check=True)
    wheels = []
    for req in requirements:
        name, version = req.split("==")
        found = [w for w in dest.glob("*.whl") if _wheel_key(w) == (_normalize(name), version)]
        if len(found) != 1:
            raise RuntimeError(f"expected one wheel for {req} in {dest}, found {found}")
        wheels.append(found[0])
    return wheels


def _usable(path: str, text: str) -> bool:
    parts = path.split("/")
    return (not SKIPPED_DIRS.intersection(parts[:-1]) and not parts[-1].startswith("test_")
            and 0 < len(text.encode()) <= MAX_FILE_BYTES and text.strip() != ""
            and max(map(len, text.splitlines())) <= MAX_LINE_CHARS)


def wheel_sources(wheel: Path, package: str) -> list[SourceFile]:
    files = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if not name.endswith(".py") or ".data/" in name:
                continue
            text = archive.read(name).decode("utf-8", errors="replace")
            if _usable(name, text):
                files.append(SourceFile(package, name, text))
    return files


def stdlib_sources() -> list[SourceFile]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        top = rel.split("/")[0].removesuffix(".py")
        if top not in EVAL_NAMES and _usable(rel, text):
            files.append(SourceFile(f"stdlib/{top}", rel, text))
    return files


def content_key(text: str) -> str:
    """Identity up to trailing whitespace and blank lines, so a re-indented copy still differs."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def is_validation_package(package: str) -> bool:
    return int(hashlib.sha256(package.encode()).hexdigest()[:8], 16) % VALIDATION_MODULUS == 0


def cap_package(files: list[SourceFile], max_bytes: int) -> list[SourceFile]:
    """A package's files in a fixed pseudo-random order (by path hash), up to max_bytes of text."""
    kept, total = [], 0
    for f in sorted(files, key=lambda f: hashlib.sha256(f.path.encode()).hexdigest()):
        if total + len(f.text) > max_bytes:
            continue
        kept.append(f)
        total += len(f.text)
    return sorted(kept, key=lambda f: f.path)


@dataclass
class Corpus:
    train: list[SourceFile]
    validation: list[SourceFile]
    evaluation: list[SourceFile]
    packages: list[str]  # the pinned requirements actually used, "name==version"
    num_duplicates: int

    def summary(self) -> str:
        def size(files: list[SourceFile]) -> str:
            packages = len({f.package for f in files})
            return f"{len(files)} files in {packages} packages, {sum(len(f.text) for f in files) / 1e6:.1f} MB"
        return (f"training: {size(self.train)}\nvalidation: {size(self.validation)} "
                f"({', '.join(sorted({f.package for f in self.validation}))})\n"
                f"evaluation: {size(self.evaluation)}\n{self.num_duplicates} duplicate files dropped")


def build_corpus(cache: Path) -> Corpus:
    """Download (cached) and split. Deterministic for a given interpreter and package list."""
    packages = pinned_packages()
    names = {req.split("==")[0].lower() for req in packages}
    if names & EVAL_NAMES:
        raise ValueError(f"{PACKAGES_FILE} must not list the evaluation packages {sorted(EVAL_NAMES)}")
    evaluation = [f for wheel, req in zip(download(list(EVAL_PACKAGES), cache / "eval"), EVAL_PACKAGES, strict=True)
                  for f in wheel_sources(wheel, req.split("==")[0])]
    by_package: dict[str, list[SourceFile]] = {}
    for f in stdlib_sources():
        by_package.setdefault(f.package, []).append(f)
    for wheel, req in zip(download(packages, cache / "train"), packages, strict=True):
        by_package[req.split("==")[0]] = wheel_sources(wheel, req.split("==")[0])

    seen = {content_key(f.text) for f in evaluation}
    duplicates = 0

    def fresh(files: list[SourceFile]) -> list[SourceFile]:
        nonlocal duplicates
        kept = []
        for f in files:
            key = content_key(f.text)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            kept.append(f)
        return kept

    order = sorted(by_package)
    validation = fresh([f for p in order if is_validation_package(p) for f in by_package[p]])
    train = fresh([f for p in order if not is_validation_package(p)
                   for f in cap_package(by_package[p], MAX_PACKAGE_BYTES)])
    return Corpus(train, validation, evaluation, packages, duplicates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "megalodon-demo")
    print(build_corpus(parser.parse_args().cache).summary())


if __name__ == "__main__":
    main()
