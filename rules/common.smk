"""Shared helpers: the stage registry (all phases, validated at parse time) and lookups for the rules."""

from dflash.launch import load_cluster, slurm_resources, stage_resources
from dflash.paths import stage_dir
from dflash.registry import canonical_json, load_registry

REG = load_registry()
PHASES = sorted(REG.phases)


wildcard_constraints:
    key="[0-9a-f]{12}",
    phase="|".join(PHASES) or "none",


def done(stage, key):
    return str(stage_dir(stage, key) / "provenance.json")


def upstream(stage):
    """Input function: the provenance.json of every upstream stage of this stage instance."""

    def inputs(wildcards):
        return [done(s, k) for s, k in REG.get(stage, wildcards.key).upstream.items()]

    return inputs


def spec(stage):
    """Params function: the stage's config subset, so Snakemake records it next to the output."""

    def param(wildcards):
        return canonical_json(REG.get(stage, wildcards.key).config)

    return param


def resource(stage, name, default):
    """Resources function: a value from the phase config's `resources.<stage>` section."""

    def value(wildcards):
        return REG.get(stage, wildcards.key).resources.get(name, default)

    return value


def slurm(stage, name):
    """Resources function: how this stage instance's job is shaped for the scheduler (dflash.launch.slurm_resources):
    GPUs per node, nodes, CPUs per GPU, and for several nodes the tasks, mpi, cpus_per_task and --gpus-per-node
    request (with the GPU type of the cluster file). None (not requested) is dropped by Snakemake."""

    def value(wildcards):
        return slurm_resources(REG.get(stage, wildcards.key).resources, load_cluster())[name]

    return value


def stage_threads(stage):
    """Threads function: CPUs per GPU for a GPU stage (each rank's share), else the stage's `cpus`."""

    def value(wildcards):
        r = stage_resources(REG.get(stage, wildcards.key).resources)
        return r["cpus_per_gpu"] if r["gpus"] else r["cpus"]

    return value


def report_inputs(wildcards):
    files = []
    for plan in REG.plans[wildcards.phase].values():
        files.append(done("train", plan.keys["train"]))
        files += [done("bench", key) for key in plan.bench.values()]
    return files


def report_key(wildcards):
    return REG.report_key(wildcards.phase)
