"""The `dflash` command: plan a phase, run one stage (what Snakemake rules call), show provenance, build reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash.config import ConfigError


def cmd_plan(args) -> int:
    from dflash.paths import report_dir
    from dflash.registry import load_registry

    reg = load_registry(only=[args.phase])
    rows = []
    for run, plan in reg.plans[args.phase].items():
        for stage, key in plan.keys.items():
            rows.append({"run": run, "stage": stage, "key": key, "dir": str(reg.get(stage, key).dir),
                         "exists": (reg.get(stage, key).dir / "provenance.json").is_file()})
        for ds, key in plan.bench.items():
            inst = reg.get("bench", key)
            rows.append({"run": run, "stage": "bench", "dataset": ds, "key": key, "dir": str(inst.dir),
                         "exists": (inst.dir / "provenance.json").is_file()})
    rep = report_dir(args.phase)
    rows.append({"run": "*", "stage": "report", "key": reg.report_key(args.phase), "dir": str(rep),
                 "exists": (rep / "provenance.json").is_file()})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"phase {args.phase} ({len(reg.plans[args.phase])} runs)")
        for r in rows:
            name = r["stage"] + (f"[{r['dataset']}]" if "dataset" in r else "")
            print(f"  {r['run']:<14} {name:<28} {r['key']}  {'done' if r['exists'] else 'todo'}  {r['dir']}")
    return 0


def cmd_stage(args) -> int:
    from dflash import stages
    from dflash.registry import load_registry

    out = stages.run(load_registry(), args.stage, args.key)
    print(out)
    return 0


def _use_results(args) -> None:
    if args.results:
        from dflash.paths import use_results

        use_results(args.results)


def cmd_report(args) -> int:
    from dflash import report
    from dflash.registry import load_registry

    _use_results(args)
    report.build(load_registry(only=[args.phase]), args.phase, links=not args.results)
    return 0


def cmd_provenance(args) -> int:
    from dflash.provenance import chain

    records = chain(args.path)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    for r in records:
        pad = "  " * r["depth"]
        if r.get("missing"):
            print(f"{pad}{r['stage']} {r['key']}  MISSING {r['dir']}")
            continue
        git = r["git"]
        print(f"{pad}{r['stage']} {r['key']}  {r['dir']}")
        print(f"{pad}  commit {str(git['commit'])[:12]}{' (dirty)' if git['dirty'] else ''}, ended {r['ended']}, "
              f"{len(r['outputs'])} output files, used by {', '.join('/'.join(u) for u in r.get('users', []))}")
        cfg = json.dumps(r["config"], sort_keys=True)
        print(f"{pad}  config {cfg[:200]}{'...' if len(cfg) > 200 else ''}")
    return 0


def cmd_launch(args) -> int:
    from dflash import launch
    from dflash.registry import load_registry

    launch.run(load_registry(), args.stage, args.key)    # replaces this process
    return 0


def cmd_install_profiles(args) -> int:
    from dflash import launch

    for line in launch.install_profiles(args.dest):
        print(line)
    return 0


def cmd_audit(args) -> int:
    from dflash import audit
    from dflash.registry import load_registry

    _use_results(args)
    result = audit.audit(load_registry(only=[args.phase]), args.phase)
    print(result.summary())
    return 0 if result.ok else 1


def cmd_publish(args) -> int:
    from dflash import publish

    _use_results(args)
    try:
        counts = publish.publish(args.phase, Path(args.dest))
    except ValueError as e:
        print(f"dflash: error: {e}", file=sys.stderr)
        return 2
    print(f"published {args.phase} to {args.dest}: {counts['dirs']} directories, {counts['copied']} files, "
          f"{counts['omitted']} weights files left out (listed in {publish.OMITTED}); check it with "
          f"`dflash audit {args.phase} --results {args.dest}`")
    return 0


def cmd_gc(args) -> int:
    from dflash import audit
    from dflash.registry import load_registry

    paths = audit.unreferenced(load_registry())
    total = 0
    for p in paths:
        n = audit.size(p)
        total += n
        print(f"{'removed' if args.delete else 'unreferenced'}  {n / 2**20:10.1f} MiB  {p}")
        if args.delete:
            audit.remove(p)
    verb = "removed" if args.delete else "can be removed (dflash gc --delete)"
    print(f"{len(paths)} paths, {total / 2**20:.1f} MiB {verb}" if paths else "nothing unreferenced")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("plan", help="runs, stages, keys and whether each output exists")
    s.add_argument("phase")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_plan)
    s = sub.add_parser("stage", help="run one stage instance (called by the Snakemake rules)")
    s.add_argument("stage")
    s.add_argument("key")
    s.set_defaults(fn=cmd_stage)
    s = sub.add_parser("report", help="build results/reports/PHASE from finished stages")
    s.add_argument("phase")
    s.add_argument("--results", default=None, help="results tree to read (default: results/; e.g. a published copy)")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("provenance", help="the provenance chain from a report, table or stage file down to the data")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_provenance)
    s = sub.add_parser("launch", help="run a stage instance with the launcher its resources ask for "
                       "(torchrun, srun + torchrun, or a Ray cluster; called by the train rule)")
    s.add_argument("stage")
    s.add_argument("key")
    s.set_defaults(fn=cmd_launch)
    s = sub.add_parser("install-profiles", help="link workflow/profiles/* into Snakemake's profile directory, so "
                       "that `snakemake --profile slurm` finds this checkout's profile")
    s.add_argument("--dest", default=None, help="default: ~/.config/snakemake (Snakemake's user profile directory)")
    s.set_defaults(fn=cmd_install_profiles)
    s = sub.add_parser("audit", help="verify a phase's report down to the raw records (checksums, keys, every cell)")
    s.add_argument("phase")
    s.add_argument("--results", default=None, help="results tree to read (default: results/; e.g. a published copy)")
    s.set_defaults(fn=cmd_audit)
    s = sub.add_parser("publish", help="copy a phase's report and its provenance chain (weights left out) to DEST, "
                       "e.g. docs/results/PHASE, for `dflash audit PHASE --results DEST`")
    s.add_argument("phase")
    s.add_argument("dest")
    s.add_argument("--results", default=None, help="results tree to copy from (default: results/)")
    s.set_defaults(fn=cmd_publish)
    s = sub.add_parser("gc", help="list result directories that no phase references (--delete removes them)")
    s.add_argument("--delete", action="store_true", help="remove them")
    s.set_defaults(fn=cmd_gc)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        print(f"dflash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
