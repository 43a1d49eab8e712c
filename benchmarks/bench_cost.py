"""What the bench work of a finished phase cost: engine starts and GPU-seconds, start-up apart from requests.

    python benchmarks/bench_cost.py PHASE [--results DIR] [--json]

Reads the provenance and records of every bench and baseline directory the phase plans (each once, also where
runs or phases share it). Bench 2 / baseline directories record the engine they ran on (`summary.engine`: loaded
or started once per job; `started_here` on the dataset that paid for it): a local model's load and warm-up time, an
SGLang server's start-up. Bench 1 directories (one job per dataset, its own baseline inside) count one process
start per job for the local engines (warm-up and graph capture recorded; the load time was not: a lower bound) and
their two servers for SGLang. Request seconds: the local engines' per-request prefill + decode (DFlash and, in
bench 1, the baseline); SGLang's wall time of the dataset's requests. GPU-seconds = seconds x the GPUs the stage's
jobs ask for (`resources.bench`; 0 on CPU). The line `bench 1 layout` gives the starts the same plan costs with one
job per dataset and a baseline in every bench job (2 servers per SGLang bench job).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash.data.jsonl import read_jsonl
from dflash.launch.slurm import stage_resources
from dflash.plan.keys import load_registry
from dflash.plan.paths import PHASES_DIR, ResultsTree


def _records(d: Path) -> list[dict]:
    return read_jsonl(d / "records.jsonl")


def _request_s(records: list[dict], with_baseline: bool) -> float:
    total = 0.0
    for r in records:
        total += r.get("prefill_s", 0.0) + r.get("decode_s", 0.0)
        if with_baseline and r.get("baseline"):
            total += r["baseline"].get("prefill_s", 0.0) + r["baseline"].get("decode_s", 0.0)
    return total


def instance_cost(stage: str, d: Path) -> dict:
    """Engine starts, start-up seconds and request seconds of one bench or baseline directory."""
    prov = json.loads((d / "provenance.json").read_text())
    s, version = prov.get("summary", {}), prov.get("version", 1)
    sglang = s.get("backend") == "sglang"
    engine = s.get("engine")
    if engine is not None:                       # bench 2, baseline: one engine per job
        started = bool(engine.get("started_here"))
        if sglang:
            startup = (engine.get("startup_s") or 0.0) if started else 0.0
        else:                                    # load and warm-up once; graph captures as caches grow
            startup = (engine.get("load_s", 0.0) + engine.get("warmup_s", 0.0)) * started + engine.get("capture_s",
                                                                                                      0.0)
        requests = s.get("wall_s_dflash" if stage == "bench" else "wall_s") if sglang else None
        if requests is None:
            requests = _request_s(_records(d), False)
        return {"starts": int(started), "startup_s": startup, "requests_s": requests, "version": version,
                "sglang": sglang}
    if sglang:                                   # bench 1: a DFLASH and a target-only server per job
        ups = s.get("server_startup_s") or {}
        return {"starts": len(ups), "startup_s": sum(v or 0.0 for v in ups.values()),
                "requests_s": (s.get("wall_s_dflash") or 0.0) + (s.get("wall_s_baseline") or 0.0),
                "version": version, "sglang": True}
    return {"starts": 1, "startup_s": s.get("warmup_s", 0.0) + s.get("capture_s", 0.0),
            "requests_s": _request_s(_records(d), True), "version": version, "sglang": False}


def phase_cost(phase: str, results: ResultsTree | None = None, phases_dir: Path = PHASES_DIR) -> dict:
    reg = load_registry(phases_dir, only=[phase], results=results)
    seen, rows = set(), []
    for plan in reg.plans[phase].values():
        for stage, key in plan.pairs():
            if stage not in ("bench", "baseline") or (stage, key) in seen:
                continue
            seen.add((stage, key))
            inst = reg.get(stage, key)
            if not (inst.dir / "provenance.json").is_file():
                raise FileNotFoundError(f"{inst.dir}: not built (bench_cost reads a finished phase)")
            gpus = stage_resources(inst.resources)["gpus"] * stage_resources(inst.resources)["nodes"]
            rows.append({"stage": stage, "key": key, "gpus": gpus, **instance_cost(stage, inst.dir)})
    out = {"phase": phase, "stages": {}}
    for stage in ("baseline", "bench"):
        mine = [r for r in rows if r["stage"] == stage]
        if not mine:
            continue
        out["stages"][stage] = {
            "instances": len(mine), "engine_starts": sum(r["starts"] for r in mine),
            "startup_s": sum(r["startup_s"] for r in mine), "requests_s": sum(r["requests_s"] for r in mine),
            "gpu_s_startup": sum(r["startup_s"] * r["gpus"] for r in mine),
            "gpu_s_requests": sum(r["requests_s"] * r["gpus"] for r in mine)}
    benches = [r for r in rows if r["stage"] == "bench"]
    out["bench1_layout_starts"] = sum(2 if r["sglang"] else 1 for r in benches)
    out["engine_starts"] = sum(v["engine_starts"] for v in out["stages"].values())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase")
    p.add_argument("--results", default=None, help="results tree (default results/; e.g. a published copy)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cost = phase_cost(args.phase, ResultsTree(Path(args.results)) if args.results else None)
    if args.json:
        print(json.dumps(cost, indent=1))
        return 0
    print(f"phase {cost['phase']}: {cost['engine_starts']} engine starts (bench 1 layout: "
          f"{cost['bench1_layout_starts']})")
    print(f"  {'stage':<9} {'instances':>9} {'starts':>6} {'start-up s':>10} {'requests s':>10} {'GPU-s start':>11} "
          f"{'GPU-s req':>9}")
    for stage, v in cost["stages"].items():
        print(f"  {stage:<9} {v['instances']:>9} {v['engine_starts']:>6} {v['startup_s']:>10.1f} "
              f"{v['requests_s']:>10.1f} {v['gpu_s_startup']:>11.1f} {v['gpu_s_requests']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
