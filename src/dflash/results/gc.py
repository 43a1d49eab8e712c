"""What `dflash gc` may remove: stage directories, checkpoints and logs whose key no phase plans, reports and run
links of removed phases or runs, and temporary directories left by killed jobs.

The work of a live process is never listed: a temporary directory whose builder (the pid in its name) still runs
on this host, and anything of a stage whose output a running Snakemake workflow has locked (`.snakemake/locks/`,
which also covers jobs running on other nodes). Those are reported as skipped, with the reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dflash.plan.keys import Registry
from dflash.processes import pid_alive
from dflash.results.provenance import tmp_owner
from dflash.stages import NAMES as STAGES

LOCKS = Path(".snakemake/locks")


def locked_outputs(locks: Path = LOCKS) -> set[tuple[str, str]]:
    """(stage, key) of every stage output that a running Snakemake workflow has locked."""
    out = set()
    for f in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        for line in f.read_text(errors="replace").splitlines():
            parts = Path(line.strip()).parts
            for i, part in enumerate(parts[:-1]):
                if part in (*STAGES, "reports") and i + 1 < len(parts):
                    out.add((part, parts[i + 1]))
    return out


def collect(reg: Registry, locks: Path = LOCKS) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(paths no phase references, [(path, why it is kept although unreferenced)])."""
    root = reg.results.root
    keys = {(s, k) for s, k in reg.instances}
    locked = locked_outputs(locks)
    found: list[tuple[Path, tuple[str, str] | None]] = []     # (path, the stage output it belongs to)

    def final_of(stage: str, d: Path) -> tuple[str, str]:
        name = d.name
        if tmp_owner(d) is not None:
            name = name.removeprefix(".tmp-").rpartition("-")[0]
        return stage, name

    for stage in STAGES:
        if (root / stage).is_dir():
            found += [(d, final_of(stage, d)) for d in sorted((root / stage).iterdir())
                      if tmp_owner(d) is not None or (stage, d.name) not in keys]
    reports = root / "reports"
    if reports.is_dir():
        found += [(d, final_of("reports", d)) for d in sorted(reports.iterdir())
                  if tmp_owner(d) is not None or d.name not in reg.phases]
    links = root / "phases"
    if links.is_dir():
        for d in sorted(links.iterdir()):
            if d.name not in reg.phases:
                found.append((d, None))
            elif d.is_dir():
                found += [(r, None) for r in sorted(d.iterdir()) if r.name not in reg.plans[d.name]]
    if reg.results.checkpoints.is_dir():
        for d in sorted(reg.results.checkpoints.iterdir()):
            stage, _, key = d.name.partition("-")
            if (stage, key) not in keys:
                found.append((d, (stage, key)))
    logs = reg.results.logs
    for stage in STAGES:
        if (logs / stage).is_dir():
            found += [(f, (stage, f.name.removesuffix(".log"))) for f in sorted((logs / stage).iterdir())
                      if (stage, f.name.removesuffix(".log")) not in keys]
    if (logs / "report").is_dir():
        found += [(f, ("reports", f.name.removesuffix(".log"))) for f in sorted((logs / "report").iterdir())
                  if f.name.removesuffix(".log") not in reg.phases]
    remove, skipped = [], []
    for path, owner in found:
        pid = tmp_owner(path)
        if pid is not None and pid_alive(pid):
            skipped.append((path, f"process {pid} is building it"))
        elif owner in locked:
            skipped.append((path, "a running workflow has locked its stage output"))
        else:
            remove.append(path)
    return remove, skipped


def size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
