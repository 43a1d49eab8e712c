"""Stage keys: every stage instance of every run of every phase, keyed by the hash of what it reads.

key = sha256(canonical JSON of {stage, format version, the config fields the stage reads, upstream keys})[:12].
A changed value therefore changes the key of the stage that reads it and of everything downstream, and two runs
(or phases) with equal inputs to a stage share one directory `results/<stage>/<key>/`. What each stage reads and
which stages feed it is the stage table (`dflash.plan.stages.STAGES`); this module only walks it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dflash.data import root as data_root
from dflash.errors import ConfigError, InputError
from dflash.plan import rehearsal
from dflash.plan.config import Phase, load_phase, phase_names
from dflash.plan.paths import PHASES_DIR, ResultsTree
from dflash.plan.stages import BY_NAME, REPORT, STAGES, alternatives


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def stage_key(stage: str, config: dict, upstream: dict, version: int | None = None) -> str:
    """`version`: the stage's format version (default: the current one; the audit passes the recorded one). `data:`
    paths are hashed in their key spelling (dflash.data.root.key_form)."""
    payload = {"stage": stage, "version": version or BY_NAME[stage].version, "config": data_root.key_form(config),
               "upstream": upstream}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:12]


def upstream_pairs(upstream: dict) -> list[tuple[str, str]]:
    """(stage, key) pairs of a recorded `upstream`: {stage: key}, or a report's {"runs": {run: RunPlan.as_dict()}}."""
    if "runs" in upstream and isinstance(upstream["runs"], dict):
        return [pair for run, keys in upstream["runs"].items() for pair in RunPlan.from_dict("", run, keys).pairs()]
    return [(s, k) for s, k in upstream.items() if isinstance(k, str)]


@dataclass
class RunPlan:
    phase: str
    run: str
    keys: dict[str, str]              # stage -> key (per-dataset stages excluded)
    bench: dict[str, str]             # dataset name -> bench key
    baseline: dict[str, str] = field(default_factory=dict)    # dataset name -> baseline key (none: not planned)

    def per_dataset(self) -> dict[str, dict[str, str]]:
        """Per-dataset stage -> {dataset: key}, the baseline first (it feeds the bench)."""
        return {"baseline": self.baseline, "bench": self.bench} if self.baseline else {"bench": self.bench}

    def pairs(self) -> list[tuple[str, str]]:
        """Every (stage, key) of the run, per-dataset stages last."""
        return [*self.keys.items(), *((s, k) for s, d in self.per_dataset().items() for k in d.values())]

    def named(self) -> dict[str, tuple[str, str]]:
        """Link name (`train`, `bench/<dataset>`, `baseline/<dataset>`) -> (stage, key)."""
        return {**{s: (s, k) for s, k in self.keys.items()},
                **{f"{s}/{ds}": (s, k) for s, d in self.per_dataset().items() for ds, k in d.items()}}

    def as_dict(self) -> dict:
        """{stage: key, ..., "bench": {dataset: key}[, "baseline": {dataset: key}]}: what the report records as its
        upstream (a tree without baselines records no "baseline" entry)."""
        return {**self.keys, **{s: dict(d) for s, d in self.per_dataset().items()}}

    @classmethod
    def from_dict(cls, phase: str, run: str, d: dict) -> RunPlan:
        return cls(phase, run, {s: k for s, k in d.items() if s not in ("bench", "baseline")},
                   dict(d.get("bench", {})), dict(d.get("baseline", {})))


@dataclass
class StageInstance:
    stage: str
    key: str
    config: dict                      # exactly the config fields this stage reads
    upstream: dict                    # upstream stage name -> key (report: {"runs": {run: RunPlan.as_dict()}})
    resources: dict                   # scheduler request (not part of the key)
    dir: Path
    logging: dict = field(default_factory=dict)                 # observability settings (not part of the key)
    users: list[tuple[str, str]] = field(default_factory=list)   # (phase, run) pairs that use it
    phase_resources: dict[str, dict] = field(default_factory=dict)   # phase -> its request, where phases differ

    def resources_for(self, phase: str | None) -> dict:
        """The scheduler request of `phase` for this shared instance (default: the first phase that plans it)."""
        return self.phase_resources.get(phase, self.resources)

    def inputs(self) -> list[tuple[str, str]]:
        """(stage, key) of every stage directory this instance reads."""
        return upstream_pairs(self.upstream)


@dataclass
class Registry:
    phases: dict[str, Phase]
    instances: dict[tuple[str, str], StageInstance]
    plans: dict[str, dict[str, RunPlan]]       # phase -> run -> plan
    reports: dict[str, StageInstance]          # phase -> its report instance
    results: ResultsTree
    broken: list[str] = field(default_factory=list)    # errors of phase files left out (tolerant loading)

    def get(self, stage: str, key: str) -> StageInstance:
        if stage == REPORT.name:
            found = [r for r in self.reports.values() if r.key == key]
            if found:
                return found[0]
        try:
            return self.instances[(stage, key)]
        except KeyError:
            unread = f" (phase files not read: {'; '.join(self.broken)})" if self.broken else ""
            raise InputError(f"no {stage} stage with key {key} in any phase under {PHASES_DIR}{unread}") from None

    def report_key(self, phase: str) -> str:
        return self.reports[phase].key

    def engine_groups(self, stage: str) -> dict[str, list[str]]:
        """Engine key -> the keys of the `stage` instances that share one engine (every phase's, in planning
        order): one job each (see `engine_key`)."""
        groups: dict[str, list[str]] = {}
        for (s, key), inst in self.instances.items():
            if s == stage:
                groups.setdefault(engine_key(inst), []).append(key)
        return groups


def planned(st, run: dict, versions: dict[str, int] | None = None) -> bool:
    """Whether a run plans stage `st` (keyed with `versions`: a stage that came with a later format version of
    another, `since`, is not part of a tree built by an earlier one)."""
    if st.since is not None:
        stage, version = st.since
        if (versions or {}).get(stage, BY_NAME[stage].version) < version:
            return False
    return st.when(run)


def plan_run(phase: Phase, run_name: str, run: dict, results: ResultsTree,
             versions: dict[str, int] | None = None) -> tuple[RunPlan, list[StageInstance]]:
    res = run["resources"]
    out: list[StageInstance] = []
    keys: dict[str, str] = {}
    per_ds: dict[str, dict[str, str]] = {}          # per-dataset stage -> dataset -> key
    for st in STAGES:
        if not planned(st, run, versions):
            continue
        for ds in (phase.datasets if st.per_dataset else [None]):
            upstream = {}
            known = {**keys, **{n: d[ds["name"]] for n, d in per_ds.items() if ds is not None and ds["name"] in d}}
            for entry in st.upstream:
                name = next((n for n in alternatives(entry) if n in known), None)
                if name is not None:
                    upstream[name] = known[name]
                elif not entry.endswith("?"):
                    raise ConfigError(f"{phase.file}: runs.{run_name}: stage {st.name} needs {entry}, which the "
                                     "run does not plan")
            config = st.select(run, phase, ds)
            if phase.rehearsal:
                config["rehearsal"] = rehearsal.stage_record(phase, run_name, st.resources or st.name, config, ds)
            key = stage_key(st.name, config, upstream, (versions or {}).get(st.name))
            out.append(StageInstance(st.name, key, config, upstream, res.get(st.resources or st.name, {}),
                                     results.stage_dir(st.name, key),
                                     {**run["logging"], "phase": phase.name, "run": run_name}))
            if ds is None:
                keys[st.name] = key
            else:
                per_ds.setdefault(st.name, {})[ds["name"]] = key
    return RunPlan(phase.name, run_name, keys, per_ds.get("bench", {}), per_ds.get("baseline", {})), out


def engine_key(inst: StageInstance) -> str:
    """The engine an instance of a per-dataset stage runs on: its key without the dataset (and the dataset's
    rehearsal substitutions) and without the baseline it reads. Instances with one engine key are one job."""
    config = {k: v for k, v in inst.config.items() if k != "dataset"}
    if "rehearsal" in config:
        config["rehearsal"] = {p: v for p, v in config["rehearsal"].items()
                               if p != "dataset" and not p.startswith("dataset.")}
    upstream = {s: k for s, k in inst.upstream.items() if s != "baseline"}
    return stage_key(inst.stage, {"engine": config}, upstream)


def plan_report(phase: Phase, plans: dict[str, RunPlan], results: ResultsTree,
                versions: dict[str, int] | None = None) -> StageInstance:
    runs = {r: p.as_dict() for r, p in plans.items()}
    config = REPORT.select(None, phase)
    if phase.rehearsal:
        config["rehearsal"] = phase.rehearsal["overlay"]
    key = stage_key(REPORT.name, config, {"runs": canonical_json(runs)}, (versions or {}).get(REPORT.name))
    return StageInstance(REPORT.name, key, {**config, "file": phase.file, "chain": phase.chain}, {"runs": runs},
                         {}, results.report_dir(phase.name), users=[(phase.name, "*")])


def build(phases: dict[str, Phase], results: ResultsTree | None = None,
          versions: dict[str, int] | None = None) -> Registry:
    """`versions`: stage format versions to key with instead of the current ones (the audit of an older tree)."""
    results = results or ResultsTree()
    instances: dict[tuple[str, str], StageInstance] = {}
    plans: dict[str, dict[str, RunPlan]] = {}
    for pname, phase in phases.items():
        plans[pname] = {}
        for rname, run in phase.runs.items():
            plan, insts = plan_run(phase, rname, run, results, versions)
            plans[pname][rname] = plan
            for inst in insts:
                shared = instances.setdefault((inst.stage, inst.key), inst)
                if (pname, rname) not in shared.users:
                    shared.users.append((pname, rname))
                shared.phase_resources.setdefault(pname, inst.resources)
    reports = {p: plan_report(phases[p], plans[p], results, versions) for p in phases}
    return Registry(phases, instances, plans, reports, results)


def load_registry(phases_dir: Path = PHASES_DIR, only: list[str] | None = None, results: ResultsTree | None = None,
                  tolerant: bool = False, rehearse: bool = False) -> Registry:
    """The phases `only` (names; `rehearsal/<phase>` is a rehearsal), else every phase file, or with `rehearse`
    every phase's rehearsal. `tolerant`: phase files that fail to load are left out and their errors kept in
    `broken` (stage jobs and the Snakefile; gc and audits stay strict)."""
    if only:
        return build({name: _load(name, phases_dir) for name in only}, results)
    phases, broken = {}, []
    for name in (rehearsal.PREFIX * rehearse + name for name in phase_names(phases_dir)):
        try:
            phases[name] = _load(name, phases_dir)
        except ConfigError as e:
            if not tolerant:
                raise
            broken.append(str(e))
    reg = build(phases, results)
    reg.broken = broken
    return reg


def _load(name: str, phases_dir: Path) -> Phase:
    return rehearsal.load(name, phases_dir) if rehearsal.is_rehearsal(name) else load_phase(name, phases_dir)


REHEARSAL_ENV = "DFLASH_REHEARSE"         # set (to 1) in the jobs of `snakemake --config rehearse=1`


def registry_of(stage: str, key: str) -> Registry:
    """The registry that plans stage instance (stage, key): every phase's, else every rehearsal's (tolerant); the
    rehearsals first where REHEARSAL_ENV says the job belongs to a rehearsal."""
    order = (True, False) if os.environ.get(REHEARSAL_ENV, "") not in ("", "0") else (False, True)
    for rehearse in order:
        reg = load_registry(tolerant=True, rehearse=rehearse)
        if (stage, key) in reg.instances or any(r.key == key for r in reg.reports.values()):
            return reg
    return reg
