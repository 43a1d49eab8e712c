"""Stage keys: every stage instance of every run of every phase, keyed by the hash of what it reads.

key = sha256(canonical JSON of {stage, format version, the config fields the stage reads, upstream keys})[:12].
A changed value therefore changes the key of the stage that reads it and of everything downstream, and two runs
(or phases) with equal inputs to a stage share one directory `results/<stage>/<key>/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dflash.config import Phase, load_all, load_phase
from dflash.paths import PHASES_DIR, stage_dir

# Bump a stage's version when its code changes what it writes: its key and all downstream keys change.
FORMAT_VERSION = {"target": 1, "prepare": 1, "regenerate": 1, "tokenize": 1, "train": 1, "convert": 1, "bench": 1,
                  "report": 1}
STAGES = ("target", "prepare", "regenerate", "tokenize", "train", "convert", "bench")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def stage_key(stage: str, config: dict, upstream: dict[str, str]) -> str:
    payload = {"stage": stage, "version": FORMAT_VERSION[stage], "config": config, "upstream": upstream}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:12]


@dataclass
class StageInstance:
    stage: str
    key: str
    config: dict                      # exactly the config fields this stage reads
    upstream: dict[str, str]          # upstream stage name -> key
    resources: dict                   # scheduler request (not part of the key)
    logging: dict = field(default_factory=dict)                 # observability settings (not part of the key)
    users: list[tuple[str, str]] = field(default_factory=list)   # (phase, run) pairs that use it

    @property
    def dir(self) -> Path:
        return stage_dir(self.stage, self.key)


@dataclass
class RunPlan:
    phase: str
    run: str
    keys: dict[str, str]              # stage -> key (bench excluded)
    bench: dict[str, str]             # dataset name -> bench key


@dataclass
class Registry:
    phases: dict[str, Phase]
    instances: dict[tuple[str, str], StageInstance]
    plans: dict[str, dict[str, RunPlan]]       # phase -> run -> plan

    def get(self, stage: str, key: str) -> StageInstance:
        try:
            return self.instances[(stage, key)]
        except KeyError:
            raise KeyError(f"no {stage} stage with key {key} in any phase under {PHASES_DIR}") from None

    def report_key(self, phase: str) -> str:
        ph = self.phases[phase]
        runs = {r: {**p.keys, "bench": p.bench} for r, p in self.plans[phase].items()}
        return stage_key("report", {"phase": phase, "references": ph.references, "external": ph.external},
                         {"runs": canonical_json(runs)})


def data_parallel(train_resources: dict) -> int:
    """Training ranks of a layout: (GPUs per node - inference GPUs) x nodes, 1 on CPU. Part of the train key, since
    the global batch (and so the schedule) is micro batch x accumulation x ranks."""
    gpus = train_resources.get("gpus", 0) - train_resources.get("inference_gpus", 0)
    return max(1, gpus) * train_resources.get("nodes", 1)


def plan_run(phase: Phase, run_name: str, run: dict) -> tuple[RunPlan, list[StageInstance]]:
    res = run["resources"]
    out: list[StageInstance] = []

    def add(stage: str, config: dict, upstream: dict[str, str]) -> str:
        key = stage_key(stage, config, upstream)
        out.append(StageInstance(stage, key, config, upstream, res.get(stage, {}),
                                 {**run["logging"], "phase": phase.name, "run": run_name}))
        return key

    keys = {"target": add("target", {"target": run["target"]}, {})}
    data = dict(run["data"])
    if data["exclude_benchmarks"]:
        data["benchmarks"] = phase.datasets
    keys["prepare"] = add("prepare", {"data": data}, {})
    if run["regenerate"]["enabled"]:
        keys["regenerate"] = add("regenerate", {"regenerate": run["regenerate"]},
                                 {"prepare": keys["prepare"], "target": keys["target"]})
        responses = {"regenerate": keys["regenerate"]}
    else:
        responses = {"prepare": keys["prepare"]}
    keys["tokenize"] = add("tokenize", {"tokenize": run["tokenize"]}, {**responses, "target": keys["target"]})
    keys["train"] = add("train", {"drafter": run["drafter"], "train": run["train"],
                                  "data_parallel": data_parallel(res.get("train", {}))},
                        {"tokenize": keys["tokenize"], "target": keys["target"]})
    keys["convert"] = add("convert", {"convert": run["convert"]}, {"train": keys["train"]})
    bench = {}
    for ds in phase.datasets:
        bench[ds["name"]] = add("bench", {"bench": run["bench"], "dataset": ds},
                                {"convert": keys["convert"], "target": keys["target"]})
    return RunPlan(phase.name, run_name, keys, bench), out


def build(phases: dict[str, Phase]) -> Registry:
    instances: dict[tuple[str, str], StageInstance] = {}
    plans: dict[str, dict[str, RunPlan]] = {}
    for pname, phase in phases.items():
        plans[pname] = {}
        for rname, run in phase.runs.items():
            plan, insts = plan_run(phase, rname, run)
            plans[pname][rname] = plan
            for inst in insts:
                inst = instances.setdefault((inst.stage, inst.key), inst)
                if (pname, rname) not in inst.users:
                    inst.users.append((pname, rname))
    return Registry(phases, instances, plans)


def load_registry(phases_dir: Path = PHASES_DIR, only: list[str] | None = None) -> Registry:
    if only:
        return build({name: load_phase(name, phases_dir) for name in only})
    return build(load_all(phases_dir))
