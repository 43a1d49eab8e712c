"""How a stage job is launched: what it asks the scheduler for, and what it runs inside its allocation.

Scheduler request. A stage's `resources` (phase file: gpus per node, nodes, cpus_per_gpu, cpus, mem_mb, runtime) plus
the cluster settings (account, partitions, GPU type: `workflow/profiles/slurm/cluster.yaml`, or the file that
$DFLASH_CLUSTER names) become Snakemake resources, which the Slurm executor plugin turns into sbatch options:

  no GPUs:           cpus_per_task=cpus nodes=1         -> sbatch --cpus-per-task=cpus --nodes=1
  one node, G GPUs:  gpu=G nodes=1 cpus_per_gpu=C      -> sbatch --gpus=[model:]G --nodes=1 --cpus-per-gpu=C
  N > 1 nodes:       mpi tasks=N nodes=N cpus_per_task -> sbatch --nodes=N --ntasks=N --cpus-per-task=C*G
                     slurm_extra=--gpus-per-node=G        --gpus-per-node=[model:]G
                     (the `mpi` resource keeps the plugin from wrapping the job in `srun -n1`; the launcher below
                     starts its own job step on every node)

cpus_per_task is never set for a job with cpus_per_gpu: the plugin would let it win.

Inside the allocation (`dflash launch <stage> <key>`):

  R training ranks per node: R = gpus - inference_gpus (1 without GPUs), the data-parallel size that the train key
  records (dflash.registry.data_parallel); the inference GPUs are allocated but get no rank.

  R <= 1, one node:        dflash stage <stage> <key>   (either launcher)
  torchrun, one node:      torchrun --standalone --nproc-per-node R --no-python dflash stage <stage> <key>
  torchrun, N nodes:       srun (one task per node) torchrun --nnodes N --rdzv-backend c10d
                           --rdzv-endpoint <first node>:<free port> ... dflash stage <stage> <key>
  ray (one or N nodes):    a Ray head here (own temp dir and ports, so jobs sharing a node never collide), one
                           Ray worker per other node through srun, then `dflash stage <stage> <key>` once with
                           DFLASH_LAUNCHER=ray, DFLASH_RAY_ADDRESS=<head> and DFLASH_RAY_WORKERS=R x N; a trap
                           stops the cluster on exit.

Every torchrun rank runs the stage; the stage runner lets only RANK 0 publish the output.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from dflash.config import ConfigError, load_schema, load_yaml

CLUSTER_FILE = Path("workflow/profiles/slurm/cluster.yaml")
CLUSTER_ENV = "DFLASH_CLUSTER"
CLUSTER_KEYS = ("account", "partition", "gpu_partition", "gpu_model", "qos", "constraint")

# Snakemake resources that the slurm profile's default-resources fill from here, for rules that do not set them.
PROFILE_RESOURCES = ("slurm_account", "slurm_partition", "qos", "constraint", "gpu_model", "cpus_per_gpu",
                     "cpus_per_task", "nodes", "mem_mb", "runtime")

RAY_PORT_NAMES = ("port", "ray-client-server-port", "dashboard-port", "node-manager-port", "object-manager-port",
                  "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                  "runtime-env-agent-port")
RAY_HEAD_ONLY = ("port", "ray-client-server-port", "dashboard-port")
RAY_WORKER_PORTS = 64          # per-job range of ports for Ray worker processes
RAY_START_TIMEOUT = 120        # seconds to wait for the head to answer


# ---- scheduler request ------------------------------------------------------------------------------------------

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


@lru_cache(maxsize=1)
def _instances_by_key() -> dict:
    from dflash.registry import load_registry

    return {key: inst for (_, key), inst in load_registry().instances.items()}


def profile_resource(name: str, wildcards=None):
    """Value of one Snakemake resource for the job with these wildcards (the slurm profile's default-resources).

    Jobs keyed by a stage key get their stage's request; others (report) the cluster's CPU defaults."""
    if name not in PROFILE_RESOURCES:
        raise ValueError(f"profile_resource: {name!r} is not one of {PROFILE_RESOURCES}")
    key = getattr(wildcards, "key", None) if wildcards is not None else None
    inst = _instances_by_key().get(key) if key else None
    return slurm_resources(inst.resources if inst else None, load_cluster())[name]


# ---- command inside the allocation ------------------------------------------------------------------------------

def dflash_exe() -> str:
    """The `dflash` console script of this environment (next to the interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / "dflash"
    return str(here) if here.is_file() else (shutil.which("dflash") or "dflash")


def stage_command(stage: str, key: str) -> list[str]:
    return [dflash_exe(), "stage", stage, key]


def free_ports(count: int, host: str = "", rng: random.Random | None = None, span: tuple = (20000, 60000)) -> int:
    """Base of `count` consecutive ports that are free on this host right now."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(span[0], span[1] - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def allocation_nodes(env: dict | None = None) -> list[str]:
    """Host names of this Slurm allocation, first node first.

    The Slurm executor's job step strips most SLURM_* variables, so the node list is asked from scontrol."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job:
            raise RuntimeError("a multi-node launch must run inside a Slurm allocation (no SLURM_JOB_ID)")
        info = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True,
                              check=True).stdout
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        nodelist = fields.get("NodeList", "")
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


def job_id(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or f"local{os.getpid()}"


def training_ranks(res: dict) -> int:
    """Training processes of a layout, all nodes together: the registry's data-parallel size (part of the train key),
    (GPUs per node - inference GPUs) x nodes, 1 per node without GPUs."""
    from dflash.registry import data_parallel

    return data_parallel(stage_resources(res))


def torchrun_command(stage: str, key: str, ranks: int, nodes: int = 1, head: str | None = None,
                     port: int | None = None, rdzv_id: str = "dflash", cpus_per_task: int | None = None,
                     gpus: int | None = None) -> list[str]:
    """torchrun with `ranks` processes per node; across nodes one torchrun per node through srun (each step with the
    node's `gpus`) and a c10d rendezvous hosted on the first node."""
    if nodes <= 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={ranks}", "--no-python",
                *stage_command(stage, key)]
    if not head or not port:
        raise ValueError("a multi-node torchrun needs the rendezvous host and port")
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cpus_per_task:
        srun.append(f"--cpus-per-task={cpus_per_task}")
    if gpus:
        srun.append(f"--gpus-per-node={gpus}")
    return [*srun, "torchrun", f"--nnodes={nodes}", f"--nproc-per-node={ranks}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{port}", f"--rdzv-id={rdzv_id}", "--no-python", *stage_command(stage, key)]


def ray_client_installed() -> bool:
    """Ray starts its client server (default port 10001) only with ray[client]; without it the port may not be set."""
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


def ray_script(stage: str, key: str, gpus: int, cpus: int, nodes: int = 1, head_ip: str = "127.0.0.1",
               head_host: str | None = None, base_port: int = 30000, temp_dir: str = "/tmp/dflash-ray",
               client: bool = False, workers: int | None = None) -> str:
    """A bash script: Ray head here, one Ray worker per other node (srun), the stage once, cluster stopped on exit.

    Ports base_port .. base_port+len(RAY_PORT_NAMES)-1 and the worker range after them belong to this job only;
    so do temp_dir and the auth token. `client`: ray[client] is installed, so the head's client server needs its
    own port. The cluster is stopped by killing the blocking `ray start` processes this script started (never
    `ray stop`, which stops every Ray instance on the node). `workers`: Ray Train workers (DFLASH_RAY_WORKERS;
    default one per GPU, or one per node without GPUs)."""
    workers = workers or max(gpus, 1) * nodes
    ports = {name: base_port + i for i, name in enumerate(RAY_PORT_NAMES)}
    lo = base_port + len(RAY_PORT_NAMES)
    per_node = [f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={temp_dir}",
                *(f"--{name}={ports[name]}" for name in RAY_PORT_NAMES if name not in RAY_HEAD_ONLY),
                f"--min-worker-port={lo}", f"--max-worker-port={lo + RAY_WORKER_PORTS - 1}",
                "--disable-usage-stats", "--block"]
    address = f"{head_ip}:{ports['port']}"
    head = ["ray", "start", "--head", f"--node-ip-address={head_ip}", f"--port={ports['port']}",
            *([f"--ray-client-server-port={ports['ray-client-server-port']}"] if client else []),
            "--include-dashboard=false", f"--dashboard-port={ports['dashboard-port']}", *per_node]
    q = shlex.join
    lines = [
        "set -uo pipefail",
        # token authentication with a token of this job's own (Ray versions without it ignore the variables)
        "export RAY_AUTH_MODE=token",
        f"export RAY_AUTH_TOKEN=$({shlex.quote(sys.executable)} -c 'import secrets; print(secrets.token_hex(32))')",
        "pids=()",
        "cleanup() {",
        '  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done',
        '  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done',
        f"  rm -rf {shlex.quote(temp_dir)}",
        "}",
        "trap cleanup EXIT",
        "trap 'exit 143' TERM INT",
        f"{q(head)} &",
        "pids+=($!)",
        "up=0",
        f"deadline=$((SECONDS + {RAY_START_TIMEOUT}))",
        "while [ $SECONDS -lt $deadline ]; do",
        f"  if ray health-check --address={address} >/dev/null 2>&1; then up=1; break; fi",
        '  kill -0 "${pids[0]}" 2>/dev/null || break',
        "  sleep 1",
        "done",
        f'[ "$up" = 1 ] || {{ echo "dflash launch: no Ray head at {address}" >&2; exit 1; }}',
    ]
    if nodes > 1:
        worker = ["srun", f"--nodes={nodes - 1}", f"--ntasks={nodes - 1}", "--ntasks-per-node=1",
                  f"--exclude={head_host or head_ip}", f"--cpus-per-task={cpus}"]
        if gpus:
            worker.append(f"--gpus-per-node={gpus}")
        worker += ["ray", "start", f"--address={address}", *per_node]
        lines += [f"{q(worker)} &", "pids+=($!)"]
    env = {"DFLASH_LAUNCHER": "ray", "DFLASH_RAY_ADDRESS": address, "DFLASH_RAY_WORKERS": str(workers)}
    lines.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + q(stage_command(stage, key)))
    return "\n".join(lines) + "\n"


def ray_temp_dir(job: str) -> str:
    """This job's Ray temp dir, short enough for Ray's unix sockets (107 bytes, of which the session adds ~60)."""
    name = f"dflash-ray-{job}"
    base = tempfile.gettempdir()
    return str(Path(base if len(base) + len(name) <= 44 else "/tmp") / name)


def host_ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def launch_command(stage: str, key: str, res: dict | None, env: dict | None = None,
                   rng: random.Random | None = None) -> list[str]:
    """The argv that runs this stage instance inside its allocation (see the module docstring)."""
    env = os.environ if env is None else env
    r = stage_resources(res)
    gpus, nodes, launcher = r["gpus"], r["nodes"], r["launcher"]
    ranks = training_ranks(r) // nodes                 # per node; the inference GPUs get no training rank
    if nodes <= 1 and ranks <= 1:
        return stage_command(stage, key)
    if launcher == "torchrun":
        if nodes <= 1:
            return torchrun_command(stage, key, ranks)
        hosts = allocation_nodes(env)
        if len(hosts) < nodes:
            raise RuntimeError(f"{stage} {key}: asks for {nodes} nodes but the allocation has {hosts}")
        return torchrun_command(stage, key, ranks, nodes, head=hosts[0], port=free_ports(1, rng=rng),
                                rdzv_id=job_id(env), cpus_per_task=r["cpus_per_gpu"] * gpus if gpus else r["cpus"],
                                gpus=gpus)
    cpus = r["cpus_per_gpu"] * gpus if gpus else r["cpus"]
    temp_dir = ray_temp_dir(job_id(env))
    base = free_ports(len(RAY_PORT_NAMES) + RAY_WORKER_PORTS, rng=rng)
    if nodes <= 1:
        script = ray_script(stage, key, gpus, cpus, 1, "127.0.0.1", None, base, temp_dir, ray_client_installed(),
                            training_ranks(r))
    else:
        hosts = allocation_nodes(env)
        here = socket.gethostname().split(".")[0]
        if here not in hosts:
            raise RuntimeError(f"{stage} {key}: this host {here} is not in the allocation {hosts}")
        script = ray_script(stage, key, gpus, cpus, nodes, host_ip(here), here, base, temp_dir,
                            ray_client_installed(), training_ranks(r))
    return ["bash", "-c", script, f"dflash-launch-{stage}-{key}"]


def run(reg, stage: str, key: str) -> None:
    """Replace this process with the launch command of a stage instance (what the train rule runs)."""
    argv = launch_command(stage, key, reg.get(stage, key).resources)
    shown = argv[2] if argv[:2] == ["bash", "-c"] else shlex.join(argv) + "\n"
    print(f"dflash launch {stage} {key}:\n{shown}", file=sys.stderr, end="", flush=True)
    os.execvp(argv[0], argv)


# ---- profiles ---------------------------------------------------------------------------------------------------

PROFILES_DIR = Path("workflow/profiles")


def snakemake_config_dir() -> Path:
    """Where `snakemake --profile NAME` looks for NAME after ./NAME (the same rule Snakemake uses)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("snakemake", "snakemake"))


def install_profiles(dest: Path | None = None, profiles_dir: Path = PROFILES_DIR) -> list[str]:
    """Link each profile of this checkout (workflow/profiles/NAME) as DEST/NAME, so `--profile NAME` finds it.

    An existing link is repointed; an existing file or directory (a profile of the user's own) is left alone and
    reported in the returned lines."""
    dest = Path(dest) if dest is not None else snakemake_config_dir()
    profiles = sorted(p for p in Path(profiles_dir).iterdir() if (p / "config.yaml").is_file())
    if not profiles:
        raise FileNotFoundError(f"no profiles (NAME/config.yaml) under {profiles_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for src in profiles:
        link = dest / src.name
        target = src.resolve()
        if link.is_symlink():
            if link.resolve() == target:
                done.append(f"{link} -> {target} (unchanged)")
                continue
            link.unlink()
        elif link.exists():
            done.append(f"{link} exists and is not a link, left alone: use `snakemake --profile {src}` "
                        f"(or move {link} away and run this again)")
            continue
        link.symlink_to(target, target_is_directory=True)
        done.append(f"{link} -> {target}")
    return done
