"""provenance.json: what made a stage directory (config, keys, code, packages, hardware, checksums)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from dflash.checksums import sha256_file, tree_checksums
from dflash.errors import DataError
from dflash.plan.keys import upstream_pairs
from dflash.plan.paths import ResultsTree

PROVENANCE = "provenance.json"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "snakemake", "numpy", "pandas", "sglang", "ray")


TMP_PREFIX = ".tmp-"


def output_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative paths), provenance.json excluded."""
    return tree_checksums(directory, skip=(PROVENANCE,))


def stage_checksums(results: ResultsTree, pairs) -> dict[str, str]:
    """'<stage>/<key>' -> sha256 of that stage directory's provenance.json, for a record's `inputs`."""
    return {f"{s}/{k}": sha256_file(results.stage_dir(s, k) / PROVENANCE) for s, k in pairs}


def tmp_name(final: Path, pid: int | None = None) -> Path:
    """The temporary directory beside `final` that process `pid` builds it in."""
    return final.parent / f"{TMP_PREFIX}{final.name}-{pid or os.getpid()}"


def tmp_owner(path: Path) -> int | None:
    """The pid that builds a temporary directory (None: not one)."""
    if not path.name.startswith(TMP_PREFIX):
        return None
    pid = path.name.rpartition("-")[2]
    return int(pid) if pid.isdigit() else None


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary name beside `final`, then move it into place whole, replacing what was
    there (an empty placeholder made by Snakemake too). On any failure the temporary directory is removed and
    `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
            final.rmdir()                      # Snakemake's empty placeholder: no output means no directory
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(src: Path, dest: Path) -> None:
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()
    os.replace(src, dest)


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"))
        return {"commit": commit, "dirty": dirty}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}


def packages() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def devices() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "gpus": []}
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def command_line() -> list[str]:
    """sys.argv with the program as run from the working directory: relative inside it, else its bare name (no
    machine's paths in a record)."""
    prog = Path(sys.argv[0])
    try:
        prog = prog.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        prog = Path(prog.name)
    return [str(prog), *sys.argv[1:]]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def record(stage: str, key: str, version: int, config: dict, upstream: dict, directory: Path, started: str,
           inputs: dict, summary: dict, users: list) -> dict:
    """`version`: the stage's format version, part of its key (records without one were written at version 1)."""
    return {
        "stage": stage, "key": key, "version": version, "config": config, "upstream": upstream,
        "users": [list(u) for u in users],
        "git": git_state(), "packages": packages(), "host": socket.gethostname(), "devices": devices(),
        "started": started, "ended": now(), "command": command_line(), "inputs": inputs, "summary": summary,
        "outputs": output_checksums(directory),
    }


def write(directory: Path, prov: dict) -> None:
    tmp = directory / (PROVENANCE + ".tmp")
    tmp.write_text(json.dumps(prov, indent=1, sort_keys=True))
    os.replace(tmp, directory / PROVENANCE)


def read(directory: Path) -> dict:
    """A stage directory's provenance record; DataError names the file when it is not a JSON object (truncated,
    edited)."""
    path = Path(directory) / PROVENANCE
    try:
        prov = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e}); remove {path.parent} and rerun its stage") from None
    if not isinstance(prov, dict):
        raise DataError(f"{path}: not a provenance record (a JSON object); remove {path.parent} and rerun its stage")
    return prov


def find_dir(path: Path) -> Path:
    """The stage (or report) directory that holds `path`: the nearest ancestor with a provenance.json."""
    path = Path(path).resolve()
    for d in [path, *path.parents] if path.is_dir() else path.parents:
        if (d / PROVENANCE).is_file():
            return d
    raise FileNotFoundError(f"{path}: no {PROVENANCE} in it or any parent directory")


def chain(path: Path) -> list[dict]:
    """Provenance records from `path`'s stage down to the data, depth first, each stage once."""
    seen, out = set(), []
    start = find_dir(path)
    results = ResultsTree.of(start)

    def visit(d: Path, depth: int) -> None:
        prov = read(d)
        ident = (prov["stage"], prov["key"])
        if ident in seen:
            return
        seen.add(ident)
        out.append({"depth": depth, "dir": str(d), **prov})
        for stage, key in upstream_pairs(prov["upstream"]):
            up = results.stage_dir(stage, key)
            if (up / PROVENANCE).is_file():
                visit(up, depth + 1)
            else:
                out.append({"depth": depth + 1, "dir": str(up), "stage": stage, "key": key, "missing": True})

    visit(start, 0)
    return out

