"""Rehearse Qwen3 phases one after another and print the table issue 14 asks for.

For each phase: `snakemake --cores N <phase> --config rehearse=1` (its rehearsal, `rehearsal/<phase>`, on the offline
Qwen3-layout target; see configs/rehearsal.yaml), then `dflash audit rehearsal/<phase>`, then the overall tau of each
run from the report's tables/tau.csv. Phases run in the order given and share one results tree, so a stage an
earlier rehearsal built (the target, a shared data stage) is not rebuilt: the jobs column counts what this phase ran.

    python benchmarks/rehearse_all.py qwen3_8b phase_a phase_b ... --json rehearsals.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def job_count(out: str) -> int:
    """Total of the "Job stats" table that Snakemake prints (0 when nothing ran)."""
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            return int(parts[1])
    return 0


def overall_tau(phase: str) -> dict[str, float]:
    table = ROOT / "results" / "reports" / "rehearsal" / phase / "tables" / "tau.csv"
    if not table.is_file():
        return {}
    return {r["run"]: float(r["tau"]) for r in csv.DictReader(open(table)) if r["dataset"] == "overall"}


def rehearse(phase: str, cores: int, log_dir: Path) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t0, c0 = time.time(), os.times()
    proc = subprocess.run([shutil.which("snakemake", path=env["PATH"]), "--cores", str(cores), phase, "--config",
                           "rehearse=1"], cwd=ROOT, capture_output=True, text=True, env=env)
    wall, c1 = time.time() - t0, os.times()
    (log_dir / f"{phase}.log").write_text(proc.stdout + proc.stderr)
    audit = subprocess.run([str(BIN / "dflash"), "audit", f"rehearsal/{phase}"], cwd=ROOT, capture_output=True,
                           text=True, env=env)
    return {"phase": phase, "exit": proc.returncode, "jobs": job_count(proc.stdout + proc.stderr),
            "wall_s": round(wall, 1), "cpu_s": round(c1.children_user + c1.children_system - c0.children_user
                                                      - c0.children_system, 1),
            "audit": (audit.stdout.splitlines() or ["(no output)"])[0].rpartition(": ")[2] if audit.returncode == 0
            else f"FAILED: {(audit.stdout + audit.stderr).strip().splitlines()[-1:]}",
            "tau": overall_tau(phase)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phases", nargs="+")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per phase")
    ap.add_argument("--logs", type=Path, default=ROOT / "results" / "logs" / "rehearse_all")
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    print("| phase | jobs | wall | audit | overall tau per run |\n|---|---|---|---|---|", flush=True)
    failed = 0
    for phase in args.phases:
        row = rehearse(phase, args.cores, args.logs)
        failed += row["exit"] != 0
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        taus = ", ".join(f"{r} {t:.2f}" for r, t in row["tau"].items()) or "-"
        status = "" if row["exit"] == 0 else f" (snakemake exit {row['exit']}, log {args.logs}/{phase}.log)"
        print(f"| {phase} | {row['jobs']} | {row['wall_s']:.0f} s | {row['audit']}{status} | {taus} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
