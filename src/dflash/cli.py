"""The `dflash` command: plan a phase, run one stage (what Snakemake rules call), show provenance, build reports.

Exit codes: 0 success, 1 a check found problems (audit), 2 a user error (config, input files, missing results;
one line on stderr), 141 when the reader of stdout quit early (as a process killed by SIGPIPE), anything else a
bug (with its traceback). `--debug` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dflash.errors import DataError, InputError, UserError
from dflash.plan.config import phase_names
from dflash.plan.keys import load_registry, registry_of
from dflash.plan.paths import ResultsTree
from dflash.plan.rehearsal import PREFIX as REHEARSAL
from dflash.processes import end_with_starter

USER_ERROR = 2
USER_ERRORS = (UserError, FileNotFoundError)
SIGPIPE_EXIT = 141          # as a process killed by SIGPIPE: the reader of stdout quit early (`dflash audit | head`)


def _registry(args, only: list[str] | None = None):
    return load_registry(only=only, results=ResultsTree(Path(args.results)) if getattr(args, "results", None) else None)


def cmd_plan(args) -> int:
    from dflash.plan import availability

    reg = _registry(args, [args.phase])
    availability.check(reg.phases[args.phase])
    engines = {(stage, key): engine for stage in ("baseline", "bench")
               for engine, keys in reg.engine_groups(stage).items() for key in keys}
    rows = []
    for run, plan in reg.plans[args.phase].items():
        for name, (stage, key) in plan.named().items():
            inst = reg.get(stage, key)
            row = {"run": run, "stage": stage, "key": key, "dir": str(inst.dir),
                   "exists": (inst.dir / "provenance.json").is_file()}
            if stage in ("bench", "baseline"):
                row["dataset"] = name.removeprefix(f"{stage}/")
                row["engine"] = engines[(stage, key)]         # its job: rule <stage>_<engine>
            rows.append(row)
    rep = reg.reports[args.phase]
    rows.append({"run": "*", "stage": "report", "key": rep.key, "dir": str(rep.dir),
                 "exists": (rep.dir / "provenance.json").is_file()})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"phase {args.phase} ({len(reg.plans[args.phase])} runs)")
        for r in rows:
            name = r["stage"] + (f"[{r['dataset']}]" if "dataset" in r else "")
            print(f"  {r['run']:<14} {name:<28} {r['key']}  {'done' if r['exists'] else 'todo'}  {r['dir']}")
        for stage in ("baseline", "bench"):
            keys = {r["key"] for r in rows if r["stage"] == stage}
            if keys:
                jobs = sum(1 for group in reg.engine_groups(stage).values() if keys & set(group))
                print(f"  {stage}: {len(keys)} instances ({sum(r['stage'] == stage for r in rows)} uses by runs), "
                      f"{jobs} engine job(s)")
    return 0


def cmd_show(args) -> int:
    from dflash.plan.config import explain, load_phase

    values = explain(args.phase)
    runs = [args.run] if args.run else list(values)
    for run in runs:
        if run not in values:
            raise InputError(f"phase {args.phase} has no run {run!r} (runs: {', '.join(values)})")
    if args.json:
        print(json.dumps({r: {p: {"value": v, "from": w} for p, (v, w) in values[r].items()} for r in runs},
                         indent=1))
        return 0
    phase = load_phase(args.phase)
    print(f"phase {args.phase}: {' extends '.join(phase.chain)}")
    print("datasets: " + ", ".join(f"{d['name']} ({d['n']})" if d.get("n") else d["name"] for d in phase.datasets))
    for run in runs:
        print(f"run {run}")
        width = min(72, max(len(p) + len(json.dumps(v)) for p, (v, _) in values[run].items()) + 4)
        for path, (value, where) in values[run].items():
            text = f"  {path}: {json.dumps(value)}"
            print(f"{text:<{width}}  # {where}")
    return 0


def cmd_status(args) -> int:
    from dflash.results import status

    table = status.rows(_registry(args, [args.phase]), args.phase)
    if args.json:
        print(json.dumps([{**r, "dir": str(r["dir"]), "log": str(r["log"])} for r in table], indent=1))
    else:
        print(status.text(args.phase, table))
    return 0


def _job_registry(stage: str, key: str):
    """The registry that plans this stage instance (phases or rehearsals). A broken phase file elsewhere is not
    the job's failure, nor its log's business (Snakemake warned once); it is named only where the lookup fails."""
    return registry_of(stage, key)


def _claim_gpus(reg, stage: str, key: str, phase: str | None = None) -> None:
    """Give a local job the GPUs its stage asks for (dflash.launch.gpus); a no-op under Slurm or without GPUs."""
    from dflash.launch.gpus import claim
    from dflash.launch.slurm import stage_resources

    claim(reg.results.root, stage_resources(reg.get(stage, key).resources_for(phase))["gpus"])


def cmd_stage(args) -> int:
    from dflash.stages import runner

    end_with_starter()
    key, *more = args.key
    reg = _job_registry(args.stage, key)
    for k in args.key:                      # every instance this job writes: one writer each
        runner.lock(reg.results, args.stage, k)
    _claim_gpus(reg, args.stage, key)
    if not more and args.engine is None:
        print(runner.run(reg, args.stage, key))
        return 0
    for d in runner.run_many(reg, args.stage, args.key, args.engine):
        print(d)
    return 0


def cmd_stages(args) -> int:
    from dflash.plan.stages import markdown_table

    print(markdown_table())
    return 0


def cmd_report(args) -> int:
    from dflash.results.report import link_runs
    from dflash.stages import runner

    reg = _registry(args, [args.phase])
    print(runner.run(reg, "report", reg.report_key(args.phase)))
    if not args.results:                 # a published tree gets no run links
        link_runs(reg, args.phase)
    return 0


def cmd_compare(args) -> int:
    from dflash.decoding import metrics
    from dflash.results.report import bench_summary

    dirs = [Path(args.a), Path(args.b)]
    for d in dirs:
        if not (d / "records.jsonl").is_file():
            raise InputError(f"{d}: no records.jsonl (expected a bench stage directory)")
    res = metrics.compare(*(_bench_records(d / "records.jsonl") for d in dirs))
    res["tau"] = []
    for d in dirs:
        try:
            res["tau"].append(bench_summary(d)["tau_macro"])
        except (ValueError, KeyError, TypeError) as e:       # records passed the checks above: the summary is bad
            raise DataError(f"{d / 'summary.json'}: not a bench summary ({e!r})") from None
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    for r in res["rows"]:
        diff = "not compared (no token ids)" if not r["compared"] else (
            "equal" if r["first_difference"] is None else f"first difference at token {r['first_difference']}")
        tau = " ".join("-" if t is None else f"{t:.3f}" for t in (r["tau_a"], r["tau_b"]))
        print(f"{r['prompt_id']:<16} turn {r['turn']}  tau {tau}  {diff}")
    print(f"{res['matched']} requests matched ({res['only_a']} only in A, {res['only_b']} only in B); equal outputs "
          f"{res['equal_outputs']}/{res['compared']}; tau A {res['tau'][0]:.4f}, B {res['tau'][1]:.4f} "
          f"(difference {res['tau'][1] - res['tau'][0]:+.4f})")
    return 0


def _bench_records(path: Path) -> list[dict]:
    """A bench's records.jsonl, each record checked for the fields `compare` matches and measures on."""
    from dflash.data.jsonl import iter_jsonl

    records = []
    for where, _, rec in iter_jsonl(path):
        if not isinstance(rec.get("prompt_id"), str) or not isinstance(rec.get("turn"), int) \
                or not isinstance(rec.get("accept_lengths"), list):
            raise DataError(f"{where}: not a bench record (needs prompt_id, turn and accept_lengths)")
        records.append(rec)
    return records


def cmd_provenance(args) -> int:
    from dflash.results.provenance import chain

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
    from dflash.launch import commands
    from dflash.stages import runner

    end_with_starter()
    reg = _job_registry(args.stage, args.key)
    runner.lock(reg.results, args.stage, args.key)
    _claim_gpus(reg, args.stage, args.key, args.phase)
    commands.run(reg, args.stage, args.key, args.phase)    # replaces this process (the GPU slots stay held)
    return 0


def cmd_install_profiles(args) -> int:
    from dflash.launch.profiles import install_profiles

    for line in install_profiles(args.dest):
        print(line)
    return 0


def cmd_audit(args) -> int:
    from dflash.results import audit
    from dflash.results.provenance import PROVENANCE

    reg = _registry(args, [args.phase])
    if not (reg.results.report_dir(args.phase) / PROVENANCE).is_file():
        raise InputError(f"{reg.results.report_dir(args.phase)}: no report (no {PROVENANCE}); build it with "
                         f"`snakemake {args.phase}`")
    result = audit.audit(reg, args.phase)
    print(result.summary())
    return 0 if result.ok else 1


def cmd_publish(args) -> int:
    from dflash.results import publish

    counts = publish.publish(_registry(args, [args.phase]).results, args.phase, Path(args.dest), args.force)
    print(f"published {args.phase} to {args.dest}: {counts['dirs']} directories, {counts['copied']} files, "
          f"{counts['omitted']} weights files left out (listed in {publish.OMITTED}); check it with "
          f"`dflash audit {args.phase} --results {args.dest}`")
    return 0


def cmd_gc(args) -> int:
    from dflash.results import gc

    paths, skipped = gc.collect(load_registry(only=[*phase_names(), *(REHEARSAL + p for p in phase_names())]))
    total = 0
    for p in paths:
        n = gc.size(p)
        total += n
        print(f"{'removed' if args.delete else 'unreferenced'}  {n / 2**20:10.1f} MiB  {p}")
        if args.delete:
            gc.remove(p)
    for p, why in skipped:
        print(f"skipped       {p}: {why}")
    verb = "removed" if args.delete else "can be removed (dflash gc --delete)"
    print(f"{len(paths)} paths, {total / 2**20:.1f} MiB {verb}" if paths else "nothing unreferenced")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, text in (
            ("plan", cmd_plan, "runs, stages, keys and whether each output exists"),
            ("show", cmd_show, "the resolved phase: every run's values (extends merged, defaults filled) and the "
                               "file, run or default each comes from"),
            ("status", cmd_status, "every stage instance of a phase: done, running (pid, elapsed time, its log's "
                                   "last progress line) or waiting")):
        s = sub.add_parser(name, help=text)
        s.add_argument("phase")
        s.add_argument("--json", action="store_true")
        s.set_defaults(fn=fn)
        if name == "show":
            s.add_argument("--run", help="only this run")
    s = sub.add_parser("stage", help="run stage instances (called by the Snakemake rules); several keys of one "
                       "per-dataset stage share one engine (one loaded model or server)")
    s.add_argument("stage")
    s.add_argument("key", nargs="+")
    s.add_argument("--engine", default=None, help="the engine key of the keys (names the job's engine logs)")
    s.set_defaults(fn=cmd_stage)
    s = sub.add_parser("stages", help="the stage table (what each stage reads, its upstream and output)")
    s.set_defaults(fn=cmd_stages)
    s = sub.add_parser("report", help="build results/reports/PHASE from finished stages")
    s.add_argument("phase")
    s.add_argument("--results", default=None, help="results tree to read (default: results/; e.g. a published copy)")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("compare", help="two bench directories request by request: tau of each request, and where "
                       "the outputs first differ (two engines, drafters or runs on the same prompts)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_compare)
    s = sub.add_parser("provenance", help="the provenance chain from a report, table or stage file down to the data")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_provenance)
    s = sub.add_parser("launch", help="run a stage instance with the launcher its resources ask for "
                       "(torchrun, srun + torchrun, or a Ray cluster; called by the train rule)")
    s.add_argument("stage")
    s.add_argument("key")
    s.add_argument("--phase", default=None, help="the phase whose resources apply to a stage several phases share "
                   "(default: the first that plans it)")
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
    s.add_argument("--force", action="store_true", help="publish into a folder that holds another phase's "
                   "publication (added beside it; nothing of it is removed)")
    s.set_defaults(fn=cmd_publish)
    s = sub.add_parser("gc", help="list result directories that no phase references (--delete removes them)")
    s.add_argument("--delete", action="store_true", help="remove them")
    s.set_defaults(fn=cmd_gc)
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = p.parse_args(argv)
    try:
        code = args.fn(args)
        sys.stdout.flush()                  # inside the try: a reader that quit early is seen here
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # no second error when Python flushes
        return SIGPIPE_EXIT
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"dflash: error: {e}", file=sys.stderr)
        return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
