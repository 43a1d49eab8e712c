"""Planning speed: CPU time of `snakemake -n <phase>` (goal for phase_k: < 3 s on a 2-core machine) and where it
goes: importing Snakemake, loading and validating every phase, hashing the stage keys, and the rest (Snakemake's DAG
and the dry-run listing).

    python benchmarks/plan_speed.py [--phase phase_k] [--repeats 3]

Run from the repository root. CPU time (user + sys of the child), not wall time: a Slurm executor plugin without a
controller and other jobs on a shared machine inflate the wall time only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 3.0


def child_cpu(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def python_cpu(code: str) -> float:
    """CPU seconds of `code` in a fresh interpreter, measured inside it (interpreter start excluded)."""
    probe = ("import resource\ndef _cpu():\n    r = resource.getrusage(resource.RUSAGE_SELF)\n"
             "    return r.ru_utime + r.ru_stime\n_t = _cpu()\n" + code + "\nprint(_cpu() - _t)\n")
    return float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="phase_k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    snakemake = str(Path(sys.executable).parent / "snakemake")
    child_cpu([snakemake, "-n", args.phase])                  # warm file system and bytecode caches
    totals = [child_cpu([snakemake, "-n", args.phase]) for _ in range(args.repeats)]
    parts = {
        "import snakemake": python_cpu("import snakemake.api, snakemake.cli"),
        "import dflash planner": python_cpu("import dflash.plan.keys, dflash.launch.slurm"),
        "load + validate every phase": python_cpu("import dflash.plan.config as c\n"
                                                  "_t = _cpu()\nc.load_all()") ,
        "load + validate + keys": python_cpu("import dflash.plan.keys as k\n_t = _cpu()\nk.load_registry()"),
    }
    total = statistics.median(totals)
    rest = total - parts["import snakemake"] - parts["import dflash planner"] - parts["load + validate + keys"]
    row = {"phase": args.phase, "cpu_s_median": round(total, 3), "cpu_s_runs": [round(t, 3) for t in totals],
           **{k: round(v, 3) for k, v in parts.items()}, "snakemake DAG + listing (rest)": round(rest, 3),
           "goal_s": GOAL_S, "date": time.strftime("%Y-%m-%d")}
    for k, v in row.items():
        print(f"{k:>34}: {v}")
    print(f"{'goal':>34}: {'met' if total < GOAL_S else 'NOT met'} ({total:.2f} s vs {GOAL_S} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
