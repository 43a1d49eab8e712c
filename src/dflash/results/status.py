"""`dflash status <phase>`: every stage instance of a phase (and its report) done, running or waiting.

Read from the results tree: done = `provenance.json` in place; running = a temporary directory
`results/<stage>/.tmp-<key>-<pid>` whose builder runs on this host (with its elapsed time and the last progress line
of `results/logs/<stage>/<key>.log`), or a job a running Snakemake workflow has started (its output marked incomplete
in `.snakemake/incomplete/` while `.snakemake/locks/` holds a lock: starting, or on another node; no pid);
waiting = neither (not started, or queued).
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from dflash.plan.keys import Registry
from dflash.processes import pid_alive
from dflash.results.provenance import TMP_PREFIX, tmp_owner

TAIL_BYTES = 16384


def last_line(log: Path) -> str | None:
    """The log's last non-empty line; a progress bar's last redraw (text after the last carriage return)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(text.replace("\r", "\n").splitlines()):
        if line.strip():
            return line.strip()
    return None


def started(pid: int, directory: Path) -> float:
    """When `pid` started (Linux /proc), else when it made `directory`."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return directory.stat().st_mtime


def builder(parent: Path, name: str) -> tuple[int, Path] | None:
    """(pid, directory) of a live process building `parent/name` here."""
    for d in parent.glob(f"{TMP_PREFIX}{name}-*") if parent.is_dir() else []:
        pid = tmp_owner(d)
        if pid is not None and d.name == f"{TMP_PREFIX}{name}-{pid}" and pid_alive(pid):
            return pid, d
    return None


def started_by_snakemake(output: Path, workflow: Path = Path(".snakemake")) -> float | None:
    """When a running Snakemake workflow started the job of `output` (its incomplete marker), else None."""
    if not any((workflow / "locks").glob("*.lock")):
        return None
    marker = workflow / "incomplete" / base64.b64encode(str(output).encode()).decode()
    try:
        return marker.stat().st_mtime
    except OSError:
        return None


def rows(reg: Registry, phase: str, now: float | None = None) -> list[dict]:
    """One row per stage instance of the phase (shared ones once, with every run that uses them), the report last."""
    now = time.time() if now is None else now
    seen: dict[tuple[str, str], dict] = {}
    for run, plan in reg.plans[phase].items():
        for name, (stage, key) in plan.named().items():
            if (stage, key) in seen:
                seen[(stage, key)]["runs"].append(run)
                continue
            seen[(stage, key)] = {"stage": stage, "key": key, "name": name, "runs": [run],
                                  "dir": reg.results.stage_dir(stage, key),
                                  "log": reg.results.logs / stage / f"{key}.log"}
    rep = reg.reports[phase]
    out = [*seen.values(), {"stage": "report", "key": rep.key, "name": "report", "runs": ["*"], "dir": rep.dir,
                            "log": reg.results.logs / "report" / f"{phase}.log"}]
    for r in out:
        r["state"], r["pid"], r["elapsed_s"], r["progress"] = "waiting", None, None, None
        if (r["dir"] / "provenance.json").is_file():
            r["state"] = "done"
            continue
        found = builder(r["dir"].parent, r["dir"].name)
        if found:
            pid, d = found
            r.update(state="running", pid=pid, elapsed_s=round(now - started(pid, d)), progress=last_line(r["log"]))
        elif (since := started_by_snakemake(r["dir"] / "provenance.json")) is not None:
            r.update(state="running", elapsed_s=round(now - since), progress=last_line(r["log"]))
    return out


def elapsed(seconds: int) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def text(phase: str, table: list[dict]) -> str:
    counts = {s: sum(r["state"] == s for r in table) for s in ("done", "running", "waiting")}
    lines = [f"phase {phase}: {counts['done']} done, {counts['running']} running, {counts['waiting']} waiting "
             f"(logs: results/logs/<stage>/<key>.log)"]
    for state in ("running", "waiting", "done"):
        for r in (r for r in table if r["state"] == state):
            runs = ",".join(r["runs"])
            line = f"  {state:<8} {r['name']:<26} {r['key']}  {runs}"
            if state == "running":
                pid = f"pid {r['pid']}" if r["pid"] else "started by Snakemake"
                line += f"  {pid}  {elapsed(r['elapsed_s'])}  {r['progress'] or '(no log line yet)'}"
            lines.append(line)
    return "\n".join(lines)
