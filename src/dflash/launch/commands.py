"""What a stage job runs inside its allocation (`dflash launch <stage> <key>`).

  R training ranks per node: R = gpus - inference_gpus (1 without GPUs), the data-parallel size that the train key
  records (dflash.plan.stages.data_parallel); the inference GPUs are allocated but get no rank.

  R <= 1, one node:        dflash stage <stage> <key>   (either launcher)
  torchrun, one node:      torchrun --standalone --nproc-per-node R --no-python dflash stage <stage> <key>
  torchrun, N nodes:       srun (one task per node) torchrun --nnodes N --rdzv-backend c10d
                           --rdzv-endpoint <first node>:<free port> ... dflash stage <stage> <key>
  ray (one or N nodes):    a Ray head here (own temp dir and ports, so jobs sharing a node never collide; one node:
                           bound to 127.0.0.1), one Ray worker per other node through srun, then
                           `dflash stage <stage> <key>` once with DFLASH_LAUNCHER=ray, DFLASH_RAY_ADDRESS=<head> and
                           DFLASH_RAY_WORKERS=R x N; a trap stops the cluster on exit.

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

from dflash.launch.slurm import stage_resources
from dflash.plan.stages import data_parallel
from dflash.ports import free_ports
from dflash.stages import runner

RAY_PORT_NAMES = ("port", "ray-client-server-port", "dashboard-port", "node-manager-port", "object-manager-port",
                  "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                  "runtime-env-agent-port")
RAY_HEAD_ONLY = ("port", "ray-client-server-port", "dashboard-port")
RAY_WORKER_PORTS = 64          # per-job range of ports for Ray worker processes
RAY_PORT_BLOCK = len(RAY_PORT_NAMES) + RAY_WORKER_PORTS    # one node's ports: the named ones, then the worker range
RAY_START_TIMEOUT = 120        # seconds to wait for the head to answer


def dflash_exe() -> str:
    """The `dflash` console script of this environment (next to the interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / "dflash"
    return str(here) if here.is_file() else (shutil.which("dflash") or "dflash")


def stage_command(stage: str, key: str) -> list[str]:
    return [dflash_exe(), "stage", stage, key]


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


# A one-node Ray cluster in a network namespace of its own, with only the loopback interface: Ray (2.60) binds its
# gRPC servers to every interface whatever --node-ip-address says, so this is what keeps its ports off the network.
ISOLATE = ("unshare", "--net", "--map-root-user")


@lru_cache(maxsize=1)
def loopback_only() -> bool:
    """Whether this node lets an unprivileged job have a private network namespace (and can bring up its `lo`)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run([*ISOLATE, "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


def ray_client_installed() -> bool:
    """Ray starts its client server (default port 10001) only with ray[client]; without it the port may not be set."""
    import importlib.util

    return importlib.util.find_spec("grpc") is not None


def ray_script(stage: str, key: str, gpus: int, cpus: int, nodes: int = 1, head_ip: str = "127.0.0.1",
               head_host: str | None = None, base_port: int = 30000, temp_dir: str = "/tmp/dflash-ray",
               client: bool = False, workers: int | None = None) -> str:
    """A bash script: Ray head here, one Ray worker per other node (srun), the stage once, cluster stopped on exit.

    Ports base_port .. base_port+len(RAY_PORT_NAMES)-1 and the worker range after them belong to this job only;
    so do temp_dir and the auth token. The other nodes take the next RAY_PORT_BLOCK ports, so that nodes sharing
    one host (a head and a worker on loopback) never collide. `client`: ray[client] is installed, so the head's
    client server needs its own port. The cluster is stopped by killing the blocking `ray start` processes this
    script started (never `ray stop`, which stops every Ray instance on the node). `workers`: Ray Train workers
    (DFLASH_RAY_WORKERS; default one per GPU, or one per node without GPUs)."""
    workers = workers or max(gpus, 1) * nodes
    ports = {name: base_port + i for i, name in enumerate(RAY_PORT_NAMES)}

    def per_node(base: int) -> list[str]:
        lo = base + len(RAY_PORT_NAMES)
        return [f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={temp_dir}",
                *(f"--{name}={base + i}" for i, name in enumerate(RAY_PORT_NAMES) if name not in RAY_HEAD_ONLY),
                f"--min-worker-port={lo}", f"--max-worker-port={lo + RAY_WORKER_PORTS - 1}",
                "--disable-usage-stats", "--block"]

    address = f"{head_ip}:{ports['port']}"
    head = ["ray", "start", "--head", f"--node-ip-address={head_ip}", f"--port={ports['port']}",
            *([f"--ray-client-server-port={ports['ray-client-server-port']}"] if client else []),
            "--include-dashboard=false", f"--dashboard-port={ports['dashboard-port']}", *per_node(base_port)]
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
        worker += ["ray", "start", f"--address={address}", *per_node(base_port + RAY_PORT_BLOCK)]
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
    base = free_ports(RAY_PORT_BLOCK * min(nodes, 2), rng=rng)
    if nodes <= 1:
        script = ray_script(stage, key, gpus, cpus, 1, "127.0.0.1", None, base, temp_dir, ray_client_installed(),
                            training_ranks(r))
        if loopback_only():
            return [*ISOLATE, "bash", "-c", "ip link set lo up || exit 1\n" + script, f"dflash-launch-{stage}-{key}"]
        print("dflash launch: no private network namespace here (unshare --net --map-root-user failed): the Ray "
              "head's servers listen on every interface of this node (token authentication on)", file=sys.stderr)
    else:
        hosts = allocation_nodes(env)
        here = socket.gethostname().split(".")[0]
        if here not in hosts:
            raise RuntimeError(f"{stage} {key}: this host {here} is not in the allocation {hosts}")
        script = ray_script(stage, key, gpus, cpus, nodes, host_ip(here), here, base, temp_dir,
                            ray_client_installed(), training_ranks(r))
    return ["bash", "-c", script, f"dflash-launch-{stage}-{key}"]


def run(reg, stage: str, key: str, phase: str | None = None) -> None:
    """Replace this process with the launch command of a stage instance (what the train rule runs)."""
    argv = launch_command(stage, key, reg.get(stage, key).resources_for(phase))
    runner.lock(reg.results, stage, key)                   # held by the launched processes (inherited through exec)
    shown = argv[2] if argv[:2] == ["bash", "-c"] else shlex.join(argv) + "\n"
    print(f"dflash launch {stage} {key}:\n{shown}", file=sys.stderr, end="", flush=True)
    os.execvp(argv[0], argv)
