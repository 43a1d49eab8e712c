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
from dflash.plan.rehearsal import PREFIX as REHEARSAL
from dflash.plan.stages import STAGE_NAMES
from dflash.processes import pid_alive
from dflash.results.provenance import tmp_owner

LOCKS = Path(".snakemake/locks")


def locked_outputs(locks: Path = LOCKS) -> set[tuple[str, str]]:
    """(stage, key) of every stage output that a running Snakemake workflow has locked."""
    out = set()
    for f in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        for line in f.read_text(errors="replace").splitlines():
            parts = Path(line.strip()).parts
            for i, part in enumerate(parts[:-1]):
                if part in (*STAGE_NAMES, "reports") and i + 1 < len(parts):
                    out.add((part, parts[i + 1]))
    return out


def by_phase(folder: Path, suffix: str = "") -> list[tuple[Path, str]]:
    """(entry, phase name) of a folder whose entries are named by phase; rehearsals (`rehearsal/<phase>`) are the
    entries of its `rehearsal` subfolder. A temporary directory is named by the phase it builds."""
    out = []
    for d in sorted(folder.iterdir()) if folder.is_dir() else []:
        if d.name + "/" == REHEARSAL and d.is_dir() and not d.is_symlink():
            out += [(e, REHEARSAL + name) for e, name in by_phase(d, suffix)]
        else:
            name = d.name.removeprefix(".tmp-").rpartition("-")[0] if tmp_owner(d) is not None else d.name
            out.append((d, name.removesuffix(suffix)))
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

    for stage in STAGE_NAMES:
        if (root / stage).is_dir():
            found += [(d, final_of(stage, d)) for d in sorted((root / stage).iterdir())
                      if tmp_owner(d) is not None or (stage, d.name) not in keys]
    found += [(d, ("reports", name)) for d, name in by_phase(root / "reports")
              if tmp_owner(d) is not None or name not in reg.phases]
    for d, name in by_phase(root / "phases"):
        if name not in reg.phases:
            found.append((d, None))
        elif d.is_dir():
            found += [(r, None) for r in sorted(d.iterdir()) if r.name not in reg.plans[name]]
    if reg.results.checkpoints.is_dir():
        for d in sorted(reg.results.checkpoints.iterdir()):
            stage, _, key = d.name.partition("-")
            if (stage, key) not in keys:
                found.append((d, (stage, key)))
    logs = reg.results.logs
    engine_logs = {(s, e) for s in STAGE_NAMES for e in reg.engine_groups(s)}   # an engine job's log (rules/stages.smk)
    for stage in STAGE_NAMES:
        if (logs / stage).is_dir():
            found += [(f, (stage, f.name.removesuffix(".log"))) for f in sorted((logs / stage).iterdir())
                      if (stage, f.name.removesuffix(".log")) not in keys | engine_logs]
    found += [(f, ("reports", name)) for f, name in by_phase(logs / "report", ".log") if name not in reg.phases]
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
