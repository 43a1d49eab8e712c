"""A Slurm allocation of several "nodes" on one host, for the two-node launcher tests.

The job runs in a private network namespace with only loopback (`unshare --net --mount --uts --map-root-user`), where
a bind-mounted /etc/hosts resolves every node name to 127.0.0.1; each node has a UTS namespace of its own whose
hostname is the node's name. The job's first process is the batch step on the first node, with the environment
Slurm gives it (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NODEID, ...), and finds this file's `srun` and `scontrol`
stand-ins first on PATH:

  scontrol show hostnames <list>   node names of a Slurm host list (`node[0-1],gpu7`), one a line
  srun [--nodes, --ntasks, --ntasks-per-node=1, --exclude, --kill-on-bad-exit, --cpus-per-task, ...] cmd...
                                   one task per node: each a process tree of its own (own session, own hostname)
                                   with that node's task environment (SLURM_NODEID, SLURM_PROCID, SLURMD_NODENAME,
                                   ...); SIGTERM is passed on; --kill-on-bad-exit=1 kills every task once one fails.
                                   The root pid of each node's task is appended to <state>/<node>.pids.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE_ENV = "LOOPBACK_SLURM_STATE"
# the node's task: its own UTS namespace named after the node
NODE_SHELL = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"']
JOB_SHELL = ("ip link set lo up && mount --bind \"$1\" /etc/hosts && hostname \"$2\" && shift 2 && exec \"$@\"")


def expand(nodelist: str) -> list[str]:
    """Node names of a Slurm host list: `a[1-2,5],b` -> a1, a2, a5, b (zero padding kept)."""
    names = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            names += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return names


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc, read once)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants at once (what a node failure does to a node's processes)."""
    for p in descendants(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def job_env(nodes: list[str], job: str, state: Path, bin_dir: Path, base: dict) -> dict:
    """The batch step's environment on the first node of an allocation of `nodes`."""
    return {**base, "PATH": f"{bin_dir}{os.pathsep}{base.get('PATH', '')}", STATE_ENV: str(state),
            "SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_JOB_NODELIST": ",".join(nodes),
            "SLURM_NODELIST": ",".join(nodes), "SLURM_JOB_NUM_NODES": str(len(nodes)), "SLURM_NNODES": str(len(nodes)),
            "SLURM_NODEID": "0", "SLURMD_NODENAME": nodes[0], "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def install(bin_dir: Path) -> Path:
    """`srun` and `scontrol` in bin_dir, both this file."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "scontrol"):
        exe = bin_dir / name
        exe.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {name} \"$@\"\n")
        exe.chmod(0o755)
    return bin_dir


def job_argv(argv: list[str], nodes: list[str], hosts: Path) -> list[str]:
    """argv as the batch step of a job on `nodes`, in the job's loopback-only network namespace."""
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {n}\n" for n in nodes))
    return ["unshare", "--net", "--mount", "--uts", "--map-root-user", "bash", "-c", JOB_SHELL, "job", str(hosts),
            nodes[0], *argv]


def scontrol(args: list[str]) -> int:
    if args[:2] != ["show", "hostnames"]:
        print(f"scontrol stand-in: only `show hostnames` ({args})", file=sys.stderr)
        return 2
    print("\n".join(expand(args[2] if len(args) > 2 else os.environ["SLURM_JOB_NODELIST"])))
    return 0


def srun(args: list[str]) -> int:
    opts = {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        opts[key] = value
    alloc = expand(os.environ["SLURM_JOB_NODELIST"])
    excluded = set(expand(opts.get("exclude", "")))
    count = int(opts.get("nodes", len(alloc)))
    nodes = [n for n in alloc if n not in excluded][:count]
    if len(nodes) < count or int(opts.get("ntasks", count)) != count or opts.get("ntasks-per-node", "1") != "1":
        print(f"srun stand-in: {opts} does not fit one task on each of {count} of {alloc} minus {excluded}",
              file=sys.stderr)
        return 1
    state = Path(os.environ[STATE_ENV])
    step = next(i for i in itertools.count() if not (state / f"step-{i}").exists())
    (state / f"step-{step}").write_text(shlex.join(args))
    tasks = []
    for rank, node in enumerate(nodes):
        env = {**os.environ, "SLURM_NODEID": str(alloc.index(node)), "SLURMD_NODENAME": node,
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_STEP_ID": str(step), "SLURM_STEPID": str(step),
               "SLURM_STEP_NODELIST": ",".join(nodes), "SLURM_STEP_NUM_NODES": str(count),
               "SLURM_STEP_NUM_TASKS": str(count), "SLURM_NTASKS": str(count), "SLURM_NPROCS": str(count)}
        if opts.get("cpus-per-task"):
            env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
        proc = subprocess.Popen([*NODE_SHELL, node, *args], env=env, start_new_session=True)
        with open(state / f"{node}.pids", "a") as f:
            f.write(f"{proc.pid}\n")
        tasks.append(proc)

    def stop(signum, frame):
        for t in tasks:
            if t.poll() is None:
                kill_tree(t.pid, signal.SIGTERM)
        deadline = time.time() + 20
        while any(t.poll() is None for t in tasks) and time.time() < deadline:
            time.sleep(0.1)
        for t in tasks:
            if t.poll() is None:
                kill_tree(t.pid)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        codes = [t.poll() for t in tasks]
        bad = [c for c in codes if c not in (None, 0)]
        if bad and opts.get("kill-on-bad-exit") == "1":
            for t in tasks:
                if t.poll() is None:
                    kill_tree(t.pid)
            for t in tasks:
                t.wait()
            return 128 - bad[0] if bad[0] < 0 else bad[0]
        if None not in codes:
            return next((128 - c if c < 0 else c for c in codes if c), 0)
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
