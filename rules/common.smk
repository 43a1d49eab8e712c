"""Shared helpers: the stage registry (all phases, validated at parse time) and lookups for the rules.

`--config rehearse=1`: the registry holds every phase's rehearsal (`rehearsal/<phase>`, configs/rehearsal.yaml), and
the target `<phase>` builds the rehearsal's report."""

import os
import sys
from pathlib import Path

from dflash.data import root as data_root
from dflash.launch.slurm import load_cluster, slurm_resources, stage_resources
from dflash.plan import availability
from dflash.plan.keys import REHEARSAL_ENV, canonical_json, load_registry
from dflash.plan.rehearsal import PREFIX as REHEARSAL
from dflash.plan.stages import BY_NAME, STAGES
from dflash.results.report import FIGURES, REFERENCE_TABLES, TABLES

if data_root.CONFIG in config:  # `--config data_root=DIR`: the data root of this run and its jobs
    os.environ[data_root.ENV] = str(Path(str(config[data_root.CONFIG])).resolve())
REHEARSE = str(config.get("rehearse", "0")).lower() not in ("0", "", "false", "no")
REG = load_registry(tolerant=True, rehearse=REHEARSE)
if REHEARSE:        # jobs look their stage up among the rehearsals first (dflash.plan.keys.registry_of)
    shell.prefix(f"set -euo pipefail; export {REHEARSAL_ENV}=1; ")
PHASES = sorted(REG.phases)
# A stage several phases share (equal key) runs with the resources of the first phase that plans it, or of the phase
# named by `--config resources_of=PHASE` (e.g. `snakemake smoke_gpu_ray --config resources_of=smoke_gpu_ray` launches
# the train stage under Ray although smoke_gpu plans it too). Snakemake passes --config on to cluster jobs.
ASKED = [p for p in str(config.get("resources_of", "")).split(",") if p]
for _p in ASKED:
    if _p not in REG.phases:
        raise ValueError(f"--config resources_of={_p}: no such phase (phases: {', '.join(PHASES)})")
_differ = [f"{_stage} {_key}: {', '.join(sorted({_inst.users[0][0], *_asks}))} -> {_inst.users[0][0]}"
           for (_stage, _key), _inst in REG.instances.items()
           if (_asks := {p: r for p, r in _inst.phase_resources.items() if r != _inst.resources})]
if workflow.is_main_process:  # once per run (not again in each cluster job, which parses this file too)
    if _differ and not ASKED:
        print(f"dflash: note: {len(_differ)} shared stage(s) planned by phases asking different resources run with "
              f"the first phase's ({'; '.join(_differ)}); choose with --config resources_of=PHASE", file=sys.stderr)
    for _problem in REG.broken:
        print(f"dflash: warning: phase left out of this workflow: {_problem}", file=sys.stderr)
CLUSTER = load_cluster()


wildcard_constraints:
    key="[0-9a-f]{12}",
    phase="|".join(PHASES) or "none",


def done(stage, key):
    return str(REG.results.stage_dir(stage, key) / "provenance.json")


def upstream(stage):
    """Input function: the provenance.json of every upstream stage of this stage instance."""

    def inputs(wildcards):
        return [done(s, k) for s, k in REG.get(stage, wildcards.key).inputs()]

    return inputs


def stage_config(stage):
    """Params function: the stage's config subset, so Snakemake records it next to the output."""

    def param(wildcards):
        return canonical_json(REG.get(stage, wildcards.key).config)

    return param


def owner(stage, key):
    """The phase whose resources a stage instance's job uses."""
    users = [p for p, _ in REG.get(stage, key).users]
    return next((p for p in ASKED if p in users), users[0] if users else None)


def job_phase(stage):
    """Params function: the phase whose resources the job uses (passed to `dflash launch --phase`). Which phases plan
    a shared stage is not what it reads, so this must not rerun it: a params function that takes `resources` counts
    as derived from them in Snakemake, and derived params are no rerun trigger."""
    return lambda wildcards, resources: owner(stage, wildcards.key)


def job_resources(stage):
    """Resources of a rule: every Snakemake resource of this stage's jobs (dflash.launch.slurm.slurm_resources,
    from `resources.<stage>` and the cluster file). A value all planned instances share is given as a constant
    (Snakemake then calls nothing per job); None (not requested) is left out."""
    table = {inst.key: slurm_resources(inst.resources_for(owner(stage, inst.key)), CLUSTER)
             for inst in REG.instances.values() if inst.stage == stage} or {None: slurm_resources(None, CLUSTER)}

    def per_job(name):
        return lambda wildcards: table[wildcards.key][name]

    out = {}
    for name in slurm_resources(None):
        values = {t[name] for t in table.values()}
        if len(values) > 1:
            out[name] = per_job(name)
        elif values != {None}:
            out[name] = values.pop()
    return out


def stage_threads(stage):
    """Threads of a rule: CPUs per GPU for a GPU stage (each rank's share), else the stage table's threads."""

    def threads(res):
        r = stage_resources(res)
        return r["cpus_per_gpu"] if r["gpus"] else BY_NAME[stage].threads

    table = {inst.key: threads(inst.resources_for(owner(stage, inst.key))) for inst in REG.instances.values()
             if inst.stage == stage}
    values = set(table.values())
    return values.pop() if len(values) == 1 else (lambda wildcards: table[wildcards.key])


def report_inputs(wildcards):
    return [done(s, k) for s, k in REG.reports[wildcards.phase].inputs() if s in BY_NAME["report"].upstream]


def report_outputs():
    """The report's files, named as in dflash.results.report (TABLES, FIGURES), each with its caption
    workflow/report/<name>.rst (a figure named like a table: <name>_fig)."""
    out = {"md": report("results/reports/{phase}/report.md", caption="../workflow/report/report.rst", category="Report")}
    for name in TABLES:
        sub = {"subcategory": "References"} if name in REFERENCE_TABLES else {}
        out[name] = report(f"results/reports/{{phase}}/tables/{name}.csv", caption=f"../workflow/report/{name}.rst",
                           category="Tables", **sub)
    for figure in FIGURES:
        name = figure.removesuffix(".png")
        name = f"{name}_fig" if name in TABLES else name
        out[name] = report(f"results/reports/{{phase}}/figures/{figure}", caption=f"../workflow/report/{name}.rst",
                           category="Figures")
    return out


def report_key(wildcards):
    return REG.report_key(wildcards.phase)


def phase_report(phase):
    """Input function of a phase's target (the report); for a phase whose local data is missing, it says what is
    missing and how to get it, and stops the run with exit 2 before anything runs (only when the phase is asked for)."""

    def inputs(wildcards):
        why = availability.message(REG.phases[phase])
        if why:
            print(f"dflash: error: {why}", file=sys.stderr)
            sys.exit(2)
        return f"results/reports/{phase}/report.md"

    return inputs


def engine_jobs(stage):
    """The jobs of a per-dataset stage: one per engine (`Registry.engine_groups`: the datasets of one run on one
    loaded model or server), each writing every dataset's keyed directory (one output per dataset). Yields
    (rule name `<stage>_<engine key>`, engine key, instance keys, inputs, threads, resources)."""
    for engine, keys in REG.engine_groups(stage).items():
        inputs = list(dict.fromkeys(done(s, k) for key in keys for s, k in REG.get(stage, key).inputs()))
        first = REG.get(stage, keys[0])
        res = slurm_resources(first.resources_for(owner(stage, keys[0])), CLUSTER)
        res["runtime"] = res["runtime"] * len(keys)       # `resources.<stage>.runtime` is per dataset
        r = stage_resources(first.resources_for(owner(stage, keys[0])))
        threads = r["cpus_per_gpu"] if r["gpus"] else BY_NAME[stage].threads
        yield f"{stage}_{engine}", engine, keys, inputs, threads, {k: v for k, v in res.items() if v is not None}


def stage_commands():
    """The shell commands of the stage rules of rules/stages.smk, by the name of each: `dflash stage <stage> <key>`,
    or `dflash launch` with the phase whose resources apply for a stage with `launch`; for an engine stage, every
    instance of one engine in one command (`dflash stage <stage> <keys> --engine <engine key>`)."""
    out = {}
    for st in STAGES:
        if st.engine:
            for engine in REG.engine_groups(st.name):
                out[f"{st.name}_{engine}"] = (f"OMP_NUM_THREADS={{threads}} dflash stage {st.name} {{params.instances}} "
                                              "--engine {params.engine} > {log} 2>&1")
        elif st.launch:
            out[st.name] = (f"OMP_NUM_THREADS={{threads}} dflash launch {st.name} {{wildcards.key}} "
                            "--phase {params.phase:q} > {log} 2>&1")
        else:
            out[st.name] = f"OMP_NUM_THREADS={{threads}} dflash stage {st.name} {{wildcards.key}} > {{log}} 2>&1"
    return out
