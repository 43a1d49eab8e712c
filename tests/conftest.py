"""Shared fixtures: a scratch copy of the repository, and one real smoke run shared by the end-to-end tests."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dflash.data import root as data_root

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"       # the project's full data folder, where a checkout has it beside
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"  # a few rows of every set, at the same paths
BIN = Path(sys.executable).parent
# The tests' data root (every `data:` path of the phases exists there), in this process and the commands it starts;
# tests that need the full files use SHARED_DATA explicitly and skip without it.
os.environ[data_root.ENV] = str(FIXTURE_DATA)


def source_files() -> list[str]:
    """The repository's files: tracked and untracked-but-not-ignored ones from git, or, in a plain copy of the
    source (a release archive, no .git), every file outside the .gitignore'd folders."""
    if (ROOT / ".git").exists():
        return subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.split()
    lines = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip()]
    rooted = {line.strip("/") for line in lines if line.startswith("/")} | {".git"}
    anywhere = {line.strip("/") for line in lines if not line.startswith("/")}

    def kept(rel: Path) -> bool:
        return rel.parts[0] not in rooted and not any(fnmatch.fnmatch(part, pat) for part in rel.parts
                                                      for pat in anywhere)

    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and kept(p.relative_to(ROOT)))


def copy_repo(dest: Path) -> Path:
    """The repository's source files (see `source_files`), copied to `dest` as a fresh git repo."""
    for f in source_files():
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


def env(data: Path | None = None) -> dict:
    """The environment of commands the tests start (`data`: their data root instead of FIXTURE_DATA)."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e['PATH']}"
    if data is not None:
        e[data_root.ENV] = str(data)
    return e


def snakemake(repo: Path, *args: str, check: bool = True, data: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "snakemake"), *args], cwd=repo, capture_output=True, text=True, env=env(data))
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


ENGINE_RULE = re.compile(r"^(\w+)_[0-9a-f]{12}$")     # `bench_<engine key>`: one rule per engine's job


def job_counts(out: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table that Snakemake prints; the rules of one per-dataset stage's
    engine jobs (`bench_<engine key>`, `baseline_<engine key>`) count under the stage's name."""
    jobs, table = {}, False
    for line in out.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            table = True
        elif table and len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "total":
                break
            m = ENGINE_RULE.match(parts[0])
            name = m.group(1) if m else parts[0]
            jobs[name] = jobs.get(name, 0) + int(parts[1])
    return jobs


def dflash(repo: Path, *args: str, data: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dflash"), *args], cwd=repo, capture_output=True, text=True, env=env(data))


@pytest.fixture(scope="module")
def one_thread():
    """Small models: extra threads only contend on a shared machine (restored afterwards). Modules that run tiny
    models use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def repo(tmp_path) -> Path:
    return copy_repo(tmp_path / "repo")


@pytest.fixture(scope="session")
def smoke_repo(tmp_path_factory) -> Path:
    """The repository copy after `snakemake --cores 2 smoke` ran to the end (the README's quick start: its time)."""
    repo = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    snakemake(repo, "--cores", "2", "smoke")
    return repo
