"""provenance.json: what made a stage directory (config, keys, code, packages, hardware, checksums)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PROVENANCE = "provenance.json"
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "snakemake", "numpy", "pandas", "sglang", "ray")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative paths), provenance.json excluded."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != PROVENANCE:
            out[str(p.relative_to(directory))] = sha256_file(p)
    return out


def stage_checksums(pairs) -> dict[str, str]:
    """'<stage>/<key>' -> sha256 of that stage directory's provenance.json, for a record's `inputs`."""
    from dflash.paths import stage_dir

    return {f"{s}/{k}": sha256_file(stage_dir(s, k) / PROVENANCE) for s, k in pairs}


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


def record(stage: str, key: str, config: dict, upstream: dict, directory: Path, started: str, inputs: dict,
           summary: dict, users: list) -> dict:
    return {
        "stage": stage, "key": key, "config": config, "upstream": upstream, "users": [list(u) for u in users],
        "git": git_state(), "packages": packages(), "host": socket.gethostname(), "devices": devices(),
        "started": started, "ended": now(), "command": command_line(), "inputs": inputs, "summary": summary,
        "outputs": output_checksums(directory),
    }


def write(directory: Path, prov: dict) -> None:
    tmp = directory / (PROVENANCE + ".tmp")
    tmp.write_text(json.dumps(prov, indent=1, sort_keys=True))
    os.replace(tmp, directory / PROVENANCE)


def read(directory: Path) -> dict:
    return json.loads((Path(directory) / PROVENANCE).read_text())


def find_dir(path: Path) -> Path:
    """The stage (or report) directory that holds `path`: the nearest ancestor with a provenance.json."""
    path = Path(path).resolve()
    for d in [path, *path.parents] if path.is_dir() else path.parents:
        if (d / PROVENANCE).is_file():
            return d
    raise FileNotFoundError(f"{path}: no {PROVENANCE} in it or any parent directory")


def chain(path: Path) -> list[dict]:
    """Provenance records from `path`'s stage down to the data, depth first, each stage once."""
    from dflash.paths import stage_dir

    seen, out = set(), []

    def visit(d: Path, depth: int) -> None:
        prov = read(d)
        ident = (prov["stage"], prov["key"])
        if ident in seen:
            return
        seen.add(ident)
        out.append({"depth": depth, "dir": str(d), **prov})
        for stage, key in _upstream_pairs(prov["upstream"]):
            up = stage_dir(stage, key)
            if (up / PROVENANCE).is_file():
                visit(up, depth + 1)
            else:
                out.append({"depth": depth + 1, "dir": str(up), "stage": stage, "key": key, "missing": True})

    visit(find_dir(path), 0)
    return out


def _upstream_pairs(upstream: dict) -> list[tuple[str, str]]:
    """(stage, key) pairs; a report's upstream holds runs -> {stage: key, bench: {dataset: key}}."""
    pairs = []
    for name, val in upstream.items():
        if isinstance(val, str):
            pairs.append((name, val))
        elif isinstance(val, dict):
            for sub_name, sub in val.items():
                if isinstance(sub, str) and name == "bench":
                    pairs.append(("bench", sub))
                elif isinstance(sub, (str, dict)):
                    pairs.extend(_upstream_pairs({sub_name: sub} if isinstance(sub, str) else sub))
    return pairs
