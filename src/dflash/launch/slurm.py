"""What a stage job asks the scheduler for.

A stage's `resources` (phase file: gpus per node, nodes, cpus_per_gpu, cpus, mem_mb, runtime) plus the cluster
settings (account, partitions, GPU type: `workflow/profiles/slurm/cluster.yaml`, or the file that $DFLASH_CLUSTER
names) become Snakemake resources, which the Slurm executor plugin turns into sbatch options:

  no GPUs:           cpus_per_task=cpus nodes=1         -> sbatch --cpus-per-task=cpus --nodes=1
  one node, G GPUs:  gpu=G nodes=1 cpus_per_gpu=C      -> sbatch --gpus=[model:]G --nodes=1 --cpus-per-gpu=C
  N > 1 nodes:       mpi tasks=N nodes=N cpus_per_task -> sbatch --nodes=N --ntasks=N --cpus-per-task=C*G
                     slurm_extra=--gpus-per-node=G        --gpus-per-node=[model:]G
                     (the `mpi` resource keeps the plugin from wrapping the job in `srun -n1`; the launcher
                     starts its own job step on every node)

cpus_per_task is never set for a job with cpus_per_gpu: the plugin would let it win. `slurm_resources` is the one
function through which resources reach Snakemake (rules/common.smk); the profiles hold executor settings only.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from dflash.plan.config import ConfigError, load_schema, load_yaml

CLUSTER_FILE = Path("workflow/profiles/slurm/cluster.yaml")
CLUSTER_ENV = "DFLASH_CLUSTER"
CLUSTER_KEYS = ("account", "partition", "gpu_partition", "gpu_model", "qos", "constraint")

@lru_cache(maxsize=1)
def _resource_defaults() -> dict:
    props = load_schema()["$defs"]["resources"]["properties"]
    return {name: spec["default"] for name, spec in props.items() if "default" in spec}


def stage_resources(res: dict | None) -> dict:
    """A stage's `resources` section with the schema defaults filled in."""
    return {**_resource_defaults(), **(res or {})}


def cluster_path() -> Path:
    return Path(os.environ.get(CLUSTER_ENV) or CLUSTER_FILE)


def load_cluster(path: Path | None = None) -> dict:
    """Account, partitions and GPU type of this cluster; a missing file or a null value means "cluster default"."""
    named = path is not None or bool(os.environ.get(CLUSTER_ENV))
    path = Path(path) if path is not None else cluster_path()
    if not path.is_file():
        if named:
            raise ConfigError(f"{path}: cluster settings file not found")
        return dict.fromkeys(CLUSTER_KEYS)
    doc = load_yaml(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(CLUSTER_KEYS)}")
    unknown = sorted(set(doc) - set(CLUSTER_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {', '.join(map(repr, unknown))} (known: {', '.join(CLUSTER_KEYS)})")
    out = {}
    for key in CLUSTER_KEYS:
        value = doc.get(key)
        if value is not None and not isinstance(value, str | int):
            raise ConfigError(f"{path}: {key}: expected a string or null (got {value!r})")
        out[key] = None if value in (None, "") else str(value)
    return out


def slurm_resources(res: dict | None, cluster: dict | None = None) -> dict:
    """Snakemake resources (as the Slurm executor plugin reads them) for a stage's `resources` section.

    A value of None means "not requested": Snakemake drops resources whose value is None."""
    r = stage_resources(res)
    cluster = cluster or {}
    gpus, nodes = r["gpus"], r["nodes"]
    model = cluster.get("gpu_model")
    out = {
        "mem_mb": r["mem_mb"], "runtime": r["runtime"], "nodes": nodes, "gpu": 0,
        "cpus_per_gpu": None, "cpus_per_task": None, "tasks": None, "mpi": None, "slurm_extra": None,
        "gpu_model": None,
        "slurm_account": cluster.get("account"),
        "slurm_partition": (cluster.get("gpu_partition") if gpus else None) or cluster.get("partition"),
        "qos": cluster.get("qos"), "constraint": cluster.get("constraint"),
    }
    if nodes > 1:
        out.update(mpi="srun", tasks=nodes, cpus_per_task=r["cpus_per_gpu"] * gpus if gpus else r["cpus"])
        if gpus:
            out["slurm_extra"] = f"--gpus-per-node={model + ':' if model else ''}{gpus}"
    elif gpus:
        out.update(gpu=gpus, cpus_per_gpu=r["cpus_per_gpu"], gpu_model=model)
    else:
        out["cpus_per_task"] = r["cpus"]
    return out
