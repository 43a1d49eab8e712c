"""Cluster execution without a cluster: scheduler requests, launch commands, profiles, and the sbatch arguments of
phase_k's train job pinned against a mock sbatch."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, copy_repo, dflash, env, snakemake
from dflash.launch import commands, profiles, slurm
from dflash.plan.paths import ResultsTree
from dflash.stages import runner

CLUSTER = {"account": "proj1", "partition": "cpu", "gpu_partition": "gpu", "gpu_model": "h100", "qos": None,
           "constraint": None}


def test_slurm_resources_cpu_one_node_and_multi_node():
    cpu = slurm.slurm_resources({"cpus": 4, "mem_mb": 1000, "runtime": 5}, CLUSTER)
    assert cpu["gpu"] == 0 and cpu["slurm_partition"] == "cpu" and cpu["slurm_account"] == "proj1"
    assert cpu["cpus_per_gpu"] is None and cpu["cpus_per_task"] == 4 and cpu["mpi"] is None
    assert cpu["gpu_model"] is None and cpu["nodes"] == 1 and (cpu["mem_mb"], cpu["runtime"]) == (1000, 5)

    one = slurm.slurm_resources({"gpus": 8, "cpus_per_gpu": 12}, CLUSTER)
    assert (one["gpu"], one["nodes"], one["cpus_per_gpu"], one["gpu_model"]) == (8, 1, 12, "h100")
    assert one["slurm_partition"] == "gpu"
    assert one["cpus_per_task"] is None and one["tasks"] is None and one["mpi"] is None   # cpus_per_task would win

    two = slurm.slurm_resources({"gpus": 8, "nodes": 2, "cpus_per_gpu": 12}, CLUSTER)
    assert (two["nodes"], two["tasks"], two["mpi"], two["cpus_per_task"]) == (2, 2, "srun", 96)
    assert two["gpu"] == 0 and two["cpus_per_gpu"] is None and two["gpu_model"] is None   # no --gpus, no ntasks-per-gpu
    assert two["slurm_extra"] == "--gpus-per-node=h100:8"
    assert slurm.slurm_resources({"gpus": 4, "nodes": 2}, {})["slurm_extra"] == "--gpus-per-node=4"
    # an unset gpu partition falls back to the partition; unset cluster values are not requested
    assert slurm.slurm_resources({"gpus": 1}, {**CLUSTER, "gpu_partition": None})["slurm_partition"] == "cpu"
    assert slurm.slurm_resources({"gpus": 1}, None)["slurm_partition"] is None


def test_cluster_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(slurm.CLUSTER_ENV, raising=False)
    assert slurm.load_cluster() == dict.fromkeys(slurm.CLUSTER_KEYS)       # no file: cluster defaults
    f = tmp_path / "c.yaml"
    f.write_text("account: 123456\npartition: gpu-a\ngpu_model: null\n")
    monkeypatch.setenv(slurm.CLUSTER_ENV, str(f))
    got = slurm.load_cluster()
    assert got["account"] == "123456" and got["partition"] == "gpu-a" and got["gpu_model"] is None
    f.write_text("acount: x\n")
    with pytest.raises(slurm.ConfigError, match="unknown key 'acount'"):
        slurm.load_cluster()
    monkeypatch.setenv(slurm.CLUSTER_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(slurm.ConfigError, match="not found"):
        slurm.load_cluster()


def test_repo_cluster_file_is_all_defaults():
    """The tracked template requests nothing, so a cluster without accounts or named partitions works as is."""
    assert slurm.load_cluster(ROOT / slurm.CLUSTER_FILE) == dict.fromkeys(slurm.CLUSTER_KEYS)


def test_resources_reach_snakemake_through_one_function():
    """rules/common.smk gives every rule slurm_resources(stage resources, cluster); the profile adds nothing."""
    gpu = slurm.slurm_resources({"gpus": 2, "cpus_per_gpu": 6, "mem_mb": 1234}, CLUSTER)
    assert (gpu["cpus_per_gpu"], gpu["slurm_partition"], gpu["gpu_model"], gpu["mem_mb"]) == (6, "gpu", "h100", 1234)
    assert gpu["cpus_per_task"] is None                                       # would beat cpus_per_gpu
    cpu = slurm.slurm_resources(None, CLUSTER)                               # the report: no stage key
    assert (cpu["slurm_partition"], cpu["gpu_model"], cpu["cpus_per_task"]) == ("cpu", None, 2)
    profile = (ROOT / "workflow/profiles/slurm/config.yaml").read_text()
    assert "default-resources" not in profile and "__import__" not in profile
    common = (ROOT / "rules/common.smk").read_text()
    assert "slurm_resources(" in common and all(("**job_resources(" in t or "in engine_jobs(" in t)
                                                for p in (ROOT / "rules").glob("*.smk") if p.name != "common.smk"
                                                for t in [p.read_text()])


# ---- launch commands ----------------------------------------------------------------------------------------------

def test_launch_command_single_process(monkeypatch):
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    for res in ({}, {"gpus": 1}, {"gpus": 1, "launcher": "ray"}, {"gpus": 0, "launcher": "ray"}):
        assert commands.launch_command("train", "abc", res, env={}) == ["dflash", "stage", "train", "abc"]


def test_launch_command_torchrun_one_node(monkeypatch):
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    assert commands.launch_command("train", "abc", {"gpus": 8}, env={}) == [
        "torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=8", "--no-python", "dflash", "stage", "train",
        "abc"]


def test_launch_command_torchrun_nodes(monkeypatch):
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    monkeypatch.setattr(commands, "allocation_nodes", lambda env: ["gpu07", "gpu08", "gpu09"])
    monkeypatch.setattr(commands, "free_ports", lambda n, rng=None: 29611)
    argv = commands.launch_command("train", "abc", {"gpus": 8, "nodes": 3, "cpus_per_gpu": 4},
                                 env={"SLURM_JOB_ID": "4242"})
    assert argv == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "--cpus-per-task=32", "--gpus-per-node=8",
                    "torchrun", "--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=gpu07:29611", "--rdzv-id=4242", "--no-python", "dflash", "stage", "train", "abc"]
    monkeypatch.setattr(commands, "allocation_nodes", lambda env: ["gpu07"])
    with pytest.raises(RuntimeError, match="asks for 3 nodes"):
        commands.launch_command("train", "abc", {"gpus": 8, "nodes": 3}, env={"SLURM_JOB_ID": "4242"})


def test_allocation_nodes_needs_slurm():
    with pytest.raises(RuntimeError, match="inside a Slurm allocation"):
        commands.allocation_nodes({})


def test_ray_one_node_script(monkeypatch):
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    argv = commands.launch_command("train", "abc", {"gpus": 4, "cpus_per_gpu": 2, "launcher": "ray"},
                                 env={"SLURM_JOB_ID": "77"}, rng=random.Random(0))
    assert argv[-4:-2] == ["bash", "-c"] and argv[:-4] == (list(commands.ISOLATE) if commands.loopback_only() else [])
    script = argv[-2]
    head = next(line for line in script.splitlines() if line.startswith("ray start --head"))
    opts = dict(o.split("=", 1) for o in shlex.split(head)[3:] if "=" in o)
    assert opts["--node-ip-address"] == "127.0.0.1" and opts["--num-gpus"] == "4" and opts["--num-cpus"] == "8"
    assert opts["--temp-dir"].endswith("dflash-ray-77") and "--block" in head
    ports = [int(opts[f"--{n}"]) for n in commands.RAY_PORT_NAMES if f"--{n}" in opts]
    assert len(ports) >= len(commands.RAY_PORT_NAMES) - 1                     # the client port only with ray[client]
    assert len(set(ports)) == len(ports) and int(opts["--min-worker-port"]) > max(ports)
    assert ("--ray-client-server-port" in opts) == commands.ray_client_installed()
    assert "srun" not in script and "ray stop" not in script                  # never stop other jobs' Ray
    last = script.strip().splitlines()[-1]
    assert last == (f"DFLASH_LAUNCHER=ray DFLASH_RAY_ADDRESS=127.0.0.1:{opts['--port']} DFLASH_RAY_WORKERS=4 "
                    "dflash stage train abc")
    assert "trap cleanup EXIT" in script
    # another job on the same node: its own ports and temp dir
    other = commands.launch_command("train", "abc", {"gpus": 4, "launcher": "ray"}, env={"SLURM_JOB_ID": "78"},
                                  rng=random.Random(1))[-2]
    assert "dflash-ray-78" in other and f"--port={opts['--port']} " not in other


def test_ray_multi_node_script(monkeypatch):
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    monkeypatch.setattr(commands, "allocation_nodes", lambda env: ["n1", "n2", "n3"])
    monkeypatch.setattr(commands.socket, "gethostname", lambda: "n1.cluster")
    monkeypatch.setattr(commands, "host_ip", lambda host: "10.0.0.1")
    script = commands.launch_command("train", "k", {"gpus": 8, "nodes": 3, "cpus_per_gpu": 4, "launcher": "ray"},
                                   env={"SLURM_JOB_ID": "9"}, rng=random.Random(0))[2]
    head = next(line for line in script.splitlines() if line.startswith("ray start --head"))
    port = dict(o.split("=", 1) for o in shlex.split(head) if "=" in o)["--port"]
    worker = next(line for line in script.splitlines() if line.startswith("srun "))
    assert worker.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude=n1 --cpus-per-task=32 "
                             "--gpus-per-node=8 ray start")
    assert f"--address=10.0.0.1:{port}" in worker and "--block" in worker and "--head" not in worker
    assert f"DFLASH_RAY_ADDRESS=10.0.0.1:{port} DFLASH_RAY_WORKERS=24 " in script
    # the worker nodes' own ports follow the head's block: a head and a worker sharing one host never collide
    head_ports = {int(v) for k, v in (o.split("=", 1) for o in shlex.split(head) if "=" in o) if k.endswith("port")}
    node_ports = {int(v) for k, v in (o.split("=", 1) for o in shlex.split(worker) if "=" in o) if k.endswith("port")}
    assert len(node_ports) == len(head_ports) - 2 and not head_ports & node_ports         # less port, dashboard
    assert node_ports <= set(range(int(port) + commands.RAY_PORT_BLOCK, int(port) + 2 * commands.RAY_PORT_BLOCK))


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_ray_script_runs_and_stops_its_cluster(tmp_path, monkeypatch):
    """The generated script against a stand-in `ray`: the stage runs once with the Ray variables, then the trap
    stops the head it started and removes its temp dir, also when the stage fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "ray", f"""#!/usr/bin/env bash
if [ "$1" = start ]; then
  for a in "$@"; do case $a in --temp-dir=*) mkdir -p "${{a#--temp-dir=}}";; esac; done
  echo $$ > {tmp_path}/head.pid; trap 'echo stopped > {tmp_path}/head.stopped; exit 0' TERM
  while true; do sleep 0.1; done
fi
[ "$1" = health-check ] && [ -f {tmp_path}/head.pid ]
""")
    stage = _exe(tmp_path / "stage", f"""#!/usr/bin/env bash
echo "$DFLASH_LAUNCHER $DFLASH_RAY_ADDRESS $DFLASH_RAY_WORKERS $*" >> {tmp_path}/stage.out
exit ${{STAGE_RC:-0}}
""")
    monkeypatch.setattr(commands, "dflash_exe", lambda: str(stage))
    for rc in (0, 3):
        for f in ("head.pid", "head.stopped"):
            (tmp_path / f).unlink(missing_ok=True)
        temp = tmp_path / f"ray-tmp-{rc}"
        script = commands.ray_script("train", "abc", 2, 4, base_port=41000, temp_dir=str(temp))
        proc = subprocess.run(["bash", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                           "STAGE_RC": str(rc)}, timeout=60)
        assert proc.returncode == rc
        assert (tmp_path / "head.stopped").is_file() and not temp.exists()
    lines = (tmp_path / "stage.out").read_text().splitlines()
    assert lines == ["ray 127.0.0.1:41000 2 stage train abc"] * 2


def test_torchrun_runs_every_rank(tmp_path, monkeypatch):
    """The one-node torchrun command for real (CPU): each of the N ranks runs the stage command."""
    if not (BIN / "torchrun").exists():
        pytest.skip("torchrun not installed")
    stage = _exe(tmp_path / "stage", f"""#!/usr/bin/env bash
echo "$RANK/$WORLD_SIZE $*" >> {tmp_path}/ranks.out
""")
    monkeypatch.setattr(commands, "dflash_exe", lambda: str(stage))
    argv = commands.launch_command("train", "abc", {"gpus": 2}, env={})
    argv[0] = str(BIN / "torchrun")
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    assert sorted((tmp_path / "ranks.out").read_text().splitlines()) == ["0/2 stage train abc", "1/2 stage train abc"]


def test_launch_run_execs(monkeypatch, capsys, tmp_path):
    class Reg:
        results = ResultsTree(tmp_path / "results")

        def get(self, stage, key):
            return type("I", (), {"resources_for": lambda self, phase: {"gpus": 8}})()

    seen = []
    monkeypatch.delenv(runner.LOCK_ENV, raising=False)            # the lock this process takes is forgotten after
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    monkeypatch.setattr(commands.os, "execvp", lambda exe, argv: seen.append(argv))
    commands.run(Reg(), "train", "abc")
    assert seen == [["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=8", "--no-python", "dflash",
                     "stage", "train", "abc"]]
    assert "torchrun --standalone" in capsys.readouterr().err
    assert Reg.results.lock_file("train", "abc").exists()                   # held across the exec


# ---- profiles -----------------------------------------------------------------------------------------------------

def test_install_profiles(tmp_path):
    dest = tmp_path / "snakemake"
    src = ROOT / profiles.PROFILES_DIR
    out = profiles.install_profiles(dest, src)
    assert {"local", "slurm"} <= {p.name for p in dest.iterdir()}
    assert (dest / "slurm").resolve() == (src / "slurm").resolve()
    assert all("unchanged" in line for line in profiles.install_profiles(dest, src))
    (dest / "slurm").unlink()
    (dest / "slurm").symlink_to(tmp_path)                                     # a link to another checkout: repointed
    profiles.install_profiles(dest, src)
    assert (dest / "slurm").resolve() == (src / "slurm").resolve()
    (dest / "local").unlink()
    (dest / "local").mkdir()                                                  # a user's own profile: left alone
    lines = profiles.install_profiles(dest, src)
    assert any("left alone" in line for line in lines) and (dest / "local").is_dir()
    assert not (dest / "local").is_symlink() and out


def _need_plugin():
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")


def test_profile_found_by_name_after_install(tmp_path):
    """`dflash install-profiles` then `snakemake --profile slurm`, literally, in a copy of the repository."""
    _need_plugin()
    repo = copy_repo(tmp_path / "repo")
    e = {**env(), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    dry = [str(BIN / "snakemake"), "--profile", "slurm", "-n", "smoke"]
    proc = subprocess.run(dry, cwd=repo, env=e, capture_output=True, text=True)
    assert proc.returncode != 0                                                  # not found before the install
    proc = subprocess.run([str(BIN / "dflash"), "install-profiles"], cwd=repo, env=e, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "config" / "snakemake" / "slurm").resolve() == (repo / "workflow/profiles/slurm").resolve()
    proc = subprocess.run(dry, cwd=repo, env=e, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Using profile slurm " in out


# ---- the sbatch arguments of phase_k's train job (mock Slurm) -----------------------------------------------------

MOCK_SBATCH = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["MOCK_SLURM_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
print(sum(1 for _ in open(os.environ["MOCK_SLURM_LOG"])))
"""
MOCK_STATUS = """#!/usr/bin/env bash
for i in $(seq "$(wc -l < "$MOCK_SLURM_LOG")"); do echo "$i|FAILED"; done
"""
MOCK_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show config" ] && echo 'MinJobAge               = 300 sec'
exit 0
"""
MOCK_SACCTMGR = """#!/usr/bin/env bash
echo ' proj1'
"""


def _mock_slurm(bin_dir: Path) -> None:
    """sbatch logs its argv and answers job ids 1, 2, ...; squeue/sacct report every job FAILED (so Snakemake stops
    after submitting); the rest answer what the executor asks before submitting."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    _exe(bin_dir / "sbatch", MOCK_SBATCH.replace("/usr/bin/env python3", sys.executable))
    _exe(bin_dir / "squeue", MOCK_STATUS)
    _exe(bin_dir / "sacct", MOCK_STATUS)
    _exe(bin_dir / "scontrol", MOCK_SCONTROL)
    _exe(bin_dir / "sacctmgr", MOCK_SACCTMGR)
    _exe(bin_dir / "sinfo", "#!/usr/bin/env bash\necho PARTITION; echo 'debug*'\n")
    for name in ("scancel", "sshare", "srun"):
        _exe(bin_dir / name, "#!/usr/bin/env bash\nexit 0\n")


def _sbatch_options(argv: list[str]) -> dict[str, str]:
    """sbatch argv as {option: value} ('' for flags), '--wrap' left out."""
    opts, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--wrap"):
            break
        if "=" in a and a.startswith("--"):
            k, v = a.split("=", 1)
            opts[k] = v
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            opts[a] = argv[i + 1]
            i += 1
        else:
            opts[a] = ""
        i += 1
    return opts


PIN_PHASES = {      # the defaults of each phase file (distinct train/bench seeds: distinct stage keys)
    # phase_k as committed; where it is missing, a stand-in with the same train request (8 GPUs on one node)
    "phase_k": "train: {seed: 1}\n  resources:\n    train: {gpus: 8, nodes: 1, cpus_per_gpu: 8, mem_mb: 512000, "
               "runtime: 60}",
    "two_nodes": "train: {seed: 2}\n  resources:\n    train: {gpus: 8, nodes: 2, cpus_per_gpu: 6, mem_mb: 400000, "
                 "runtime: 90}",
    "gpu_bench": "bench: {seed: 3}\n  resources:\n    bench: {gpus: 1, cpus_per_gpu: 6, mem_mb: 64000, runtime: 30}",
}
PIN_JOBS = {"phase_k": ("train", ("tokenize", "target")), "two_nodes": ("train", ("tokenize", "target")),
            "gpu_bench": ("bench", ("convert", "target", "baseline"))}


@pytest.fixture(scope="module")
def pinned_sbatch(tmp_path_factory) -> dict[str, dict[str, str]]:
    """One `snakemake --profile slurm` against the mock Slurm, asking for run R00's train job of phase_k and of a
    two-node phase and for a GPU bench job, each with its upstream outputs in place so that exactly these jobs are
    submitted. Returns each phase's sbatch options."""
    _need_plugin()
    tmp = tmp_path_factory.mktemp("pin")
    repo = copy_repo(tmp / "repo")
    _mock_slurm(tmp / "mockbin")
    (tmp / "cluster.yaml").write_text("account: proj1\npartition: cpu\ngpu_partition: gpu\ngpu_model: h100\n")
    for phase, text in PIN_PHASES.items():
        path = repo / "configs" / "phases" / f"{phase}.yaml"
        if not path.is_file():
            path.write_text(f"defaults:\n  {text}\nruns:\n  R00: {{}}\n"
                            "datasets:\n  - {name: synthetic_math, n: 2}\n")
    targets, comments = [], {}
    for phase, (stage, upstream) in PIN_JOBS.items():
        keys, engines = {}, {}
        for r in json.loads(dflash(repo, "plan", phase, "--json").stdout):
            if r["run"] == "R00":
                keys.setdefault(r["stage"], r["key"])          # bench: the first dataset
                engines.setdefault(r["stage"], r.get("engine"))
        for up in upstream:
            d = repo / "results" / up / keys[up]
            d.mkdir(parents=True, exist_ok=True)
            (d / "provenance.json").write_text("{}")
            os.utime(d / "provenance.json", (1e9, 1e9))      # one old mtime: no upstream looks newer than the next
        targets.append(f"results/{stage}/{keys[stage]}/provenance.json")
        rule = f"rule_{stage}_{engines[stage]}" if engines[stage] else f"rule_{stage}_wildcards_{keys[stage]}"
        comments[rule] = phase                                 # bench: one rule per engine, no wildcards
    log = tmp / "sbatch.jsonl"
    e = {**env(), "MOCK_SLURM_LOG": str(log), "XDG_CONFIG_HOME": str(tmp / "config"),
         "DFLASH_CLUSTER": str(tmp / "cluster.yaml")}
    e["PATH"] = f"{tmp / 'mockbin'}{os.pathsep}{e['PATH']}"
    subprocess.run([str(BIN / "dflash"), "install-profiles"], cwd=repo, env=e, check=True, capture_output=True)
    proc = subprocess.run([str(BIN / "snakemake"), "--profile", "slurm", "--slurm-init-seconds-before-status-checks",
                           "1", "--keep-going", *targets], cwd=repo, env=e, capture_output=True, text=True, timeout=300)
    calls = [_sbatch_options(json.loads(line)) for line in log.read_text().splitlines()] if log.is_file() else []
    by_phase = {comments[c["--comment"]]: c for c in calls if c.get("--comment") in comments}
    assert len(calls) == len(PIN_JOBS) and len(by_phase) == len(PIN_JOBS), (proc.stdout + proc.stderr)[-3000:]
    return by_phase


def test_sbatch_args_phase_k_train(pinned_sbatch):
    """phase_k's train job: 8 GPUs of one node, 8 CPUs per GPU, 512 GB, 60 min, the GPU partition and account of the
    cluster file; no --cpus-per-task (it would override --cpus-per-gpu) and no task-per-GPU geometry."""
    opts = pinned_sbatch["phase_k"]
    assert opts["--gpus"] == "h100:8"
    assert opts["--cpus-per-gpu"] == "8"
    assert opts["--nodes"] == "1"
    assert opts["--mem"] == "512000"
    assert opts["-t"] == "60"
    assert opts["-p"] == "gpu"
    assert opts["-A"] == "proj1"
    for absent in ("--cpus-per-task", "--ntasks-per-gpu", "--ntasks", "--gpus-per-node", "--gres"):
        assert absent not in opts, absent


def test_sbatch_args_two_node_train(pinned_sbatch):
    """Two nodes: one task per node (the launcher's srun steps), CPUs per task = 8 x CPUs per GPU, GPUs per node."""
    opts = pinned_sbatch["two_nodes"]
    assert opts["--nodes"] == "2" and opts["--ntasks"] == "2" and opts["--cpus-per-task"] == "48"
    assert opts["--gpus-per-node"] == "h100:8" and opts["--mem"] == "400000" and opts["-t"] == "90"
    assert opts["-p"] == "gpu" and opts["-A"] == "proj1"
    for absent in ("--gpus", "--cpus-per-gpu", "--ntasks-per-gpu"):
        assert absent not in opts, absent


def test_sbatch_args_gpu_job_of_another_rule(pinned_sbatch):
    """A GPU job of a rule that declares only gpu/mem/runtime (bench) gets its CPUs per GPU, partition and GPU type
    from the profile's default-resources, and no --cpus-per-task."""
    opts = pinned_sbatch["gpu_bench"]
    assert opts["--gpus"] == "h100:1" and opts["--cpus-per-gpu"] == "6" and opts["--nodes"] == "1"
    assert opts["--mem"] == "64000" and opts["-t"] == "30" and opts["-p"] == "gpu" and opts["-A"] == "proj1"
    assert "--cpus-per-task" not in opts


def test_ray_script_with_real_ray(tmp_path, monkeypatch):
    """The one-node Ray script with the installed Ray: the head comes up on this job's ports, the stage connects
    through DFLASH_RAY_ADDRESS and runs a task, and on exit no process of this cluster is left."""
    if not (BIN / "ray").exists():
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    stage = _exe(tmp_path / "stage", f"""#!{sys.executable}
import os, ray
ray.init(address=os.environ["DFLASH_RAY_ADDRESS"])
print("task", ray.get(ray.remote(lambda: 42).remote()), os.environ["DFLASH_RAY_WORKERS"])
""")
    monkeypatch.setattr(commands, "dflash_exe", lambda: str(stage))
    temp = Path(commands.ray_temp_dir(f"test{os.getpid()}"))                   # Ray's socket paths must stay short
    script = commands.ray_script("train", "abc", 0, 1, base_port=commands.free_ports(80), temp_dir=str(temp),
                               client=commands.ray_client_installed())
    proc = subprocess.Popen(["bash", "-c", script], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "task 42 1" in out
    assert not temp.exists()
    left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
    assert not left, left


def test_ray_temp_dir_stays_short(monkeypatch):
    monkeypatch.setattr(commands.tempfile, "gettempdir", lambda: "/scratch/" + "x" * 60)
    assert len(commands.ray_temp_dir("123456789")) <= 44
    monkeypatch.setattr(commands.tempfile, "gettempdir", lambda: "/tmp")
    assert commands.ray_temp_dir("12") == "/tmp/dflash-ray-12"


def test_inference_gpus_get_no_training_rank(monkeypatch):
    """phase_k's 2I+6T layout: all 8 GPUs allocated, 6 training ranks (the train key's data-parallel size)."""
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    res = {"gpus": 8, "inference_gpus": 2}
    assert commands.training_ranks(res) == 6
    assert slurm.slurm_resources(res, CLUSTER)["gpu"] == 8
    assert "--nproc-per-node=6" in commands.launch_command("train", "k", res, env={})
    script = commands.launch_command("train", "k", {**res, "launcher": "ray"}, env={}, rng=random.Random(0))[-2]
    assert "--num-gpus=8" in script and "DFLASH_RAY_WORKERS=6 " in script
    monkeypatch.setattr(commands, "allocation_nodes", lambda env: ["a", "b"])
    argv = commands.launch_command("train", "k", {**res, "nodes": 2}, env={"SLURM_JOB_ID": "1"})
    assert "--nproc-per-node=6" in argv and "--gpus-per-node=8" in argv and "--nnodes=2" in argv
    assert commands.launch_command("train", "k", {"gpus": 2, "inference_gpus": 1}, env={}) == [
        "dflash", "stage", "train", "k"]                                      # one training rank: no torchrun


def test_a_shared_stage_takes_the_resources_of_the_phase_named_in_config(repo):
    """smoke_gpu and smoke_gpu_ray plan one train stage (equal keys); --config resources_of picks whose launcher the
    job uses, and without it the planner says which phase's resources apply."""
    plain = snakemake(repo, "-n", "-p", "smoke_gpu_ray")
    assert "--phase smoke_gpu " in plain.stdout
    assert re.search(r"train [0-9a-f]{12}: smoke_gpu, smoke_gpu_ray -> smoke_gpu;", plain.stderr)      # said once
    assert plain.stderr.count("dflash: note") == 1
    chosen = snakemake(repo, "-n", "-p", "smoke_gpu_ray", "--config", "resources_of=smoke_gpu_ray")
    assert "dflash launch train" in chosen.stdout and "--phase smoke_gpu_ray" in chosen.stdout


def test_launch_phase_option_picks_that_phases_request(monkeypatch, tmp_path):
    class Inst:
        resources = {"gpus": 2, "launcher": "torchrun"}

        def resources_for(self, phase):
            return {"gpus": 2, "launcher": "ray"} if phase == "p_ray" else self.resources

    class Reg:
        results = ResultsTree(tmp_path)

        def get(self, stage, key):
            return Inst()

    seen = []
    monkeypatch.delenv(runner.LOCK_ENV, raising=False)            # the lock this process takes is forgotten after
    monkeypatch.setattr(commands, "dflash_exe", lambda: "dflash")
    monkeypatch.setattr(commands.os, "execvp", lambda exe, argv: seen.append(argv))
    commands.run(Reg(), "train", "abc", "p_ray")
    commands.run(Reg(), "train", "abc")
    assert seen[0][-4:-2] == ["bash", "-c"] and "ray start --head" in seen[0][-2]
    assert seen[1][0] == "torchrun"


def test_one_node_ray_cluster_listens_on_no_interface_of_the_host(tmp_path, monkeypatch):
    """Ray binds its servers to every interface whatever --node-ip-address says; a one-node job therefore runs its
    cluster in a network namespace with only loopback. While the stage runs inside (its Ray task done), none of the
    job's ports listens in this, the host's, namespace."""
    if not (BIN / "ray").exists() or not commands.loopback_only():
        pytest.skip("needs Ray and an unprivileged network namespace (unshare --net --map-root-user)")
    ready = tmp_path / "ready"
    stage = _exe(tmp_path / "stage", f"""#!{sys.executable}
import os, pathlib, ray, time
ray.init(address=os.environ["DFLASH_RAY_ADDRESS"])
print("task", ray.get(ray.remote(lambda: 7).remote()))
pathlib.Path({str(ready)!r}).write_text("up")
time.sleep(4)
""")
    monkeypatch.setattr(commands, "dflash_exe", lambda: str(stage))
    monkeypatch.setattr(commands, "ray_temp_dir", lambda job: str(Path(commands.tempfile.gettempdir()) / f"r{job}"))
    argv = commands.launch_command("train", "k", {"gpus": 2, "cpus_per_gpu": 1, "launcher": "ray"},
                                   env={"SLURM_JOB_ID": f"ns{os.getpid()}"}, rng=random.Random(3))
    base = int(next(a for a in shlex.split(argv[-2]) if a.startswith("--port=")).split("=")[1])
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def host_listening() -> set[int]:
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":
                    ports.add(int(local.split(":")[1], 16))
        return ports

    try:
        deadline = time.time() + 240
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert ready.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "timeout"
        ours = {p for p in host_listening() if base <= p < base + len(commands.RAY_PORT_NAMES) + 64}
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait()
    assert proc.returncode == 0 and "task 7" in out, err[-3000:]
    assert not ours, f"the job's Ray ports {sorted(ours)} listen on the host"


# ---- two nodes on one host: the launcher's own commands, run (loopback only) ----------------------------------------
# A tiny target (2 layers of width 64, a few pretraining steps) and 96 synthetic rows; every layout trains the same
# global batch: 2 rows per micro-batch, 4 micro-batches per step (one process accumulating 4, or two ranks
# accumulating 2 each). Anchor sampling is seeded per (step, rank), so one rank would sample other anchors than two
# ranks do; with num_anchors at least the padded row length every valid position is an anchor in every layout, and
# all layouts compute the same loss.

LOOPBACK_BASE = {
    "target": {"kind": "synthetic", "synthetic": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                                  "num_layers": 3, "corpus_size": 200, "steps": 4, "batch_size": 8,
                                                  "seq_len": 64}},
    "data": {"sources": [{"kind": "synthetic", "n": 96}]},
    "regenerate": {"enabled": False},
    "tokenize": {"max_length": 128, "min_loss_tokens": 4},
    "drafter": {"num_layers": 1, "block_size": 4},
    "train": {"max_steps": 12, "gamma": 7.0, "micro_batch_size": 2, "grad_accum": 2, "num_anchors": 128, "log_every": 1,
              "save_every": 2, "keep_last": 4, "pad_to": "dataset"},
}
LOOPBACK_LAYOUTS = {                # phase -> (train overrides, train resources)
    "lb_one_proc": ({"grad_accum": 4}, {}),
    "lb_one_node": ({}, {"gpus": 2}),                      # 1 node x 2 processes (torchrun --standalone), gloo on CPU
    "lb_two_nodes": ({}, {"nodes": 2}),                    # 2 nodes x 1 process (srun + torchrun, c10d rendezvous)
    "lb_two_nodes_ray": ({}, {"nodes": 2, "launcher": "ray", "cpus": 1}),   # a Ray head and a Ray worker node
}
# Slurm job ids of this test session (the Ray temp dir and the rendezvous id are named by them)
JOB = str(os.getpid())
# one thread per process in every layout, so that no kernel splits its sums differently between layouts
LOOPBACK_ENV = {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_object_store_memory": str(100 * 2**20)}


def _loopback_namespaces() -> bool:
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "--map-root-user", "sh", "-c",
                            "ip link set lo up && unshare --uts hostname n1"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """A repository copy with one phase per layout (the same train config and global batch), their shared upstream
    stages built, and the reference drafters of 1 process and of 1 node x 2 processes trained through the launcher.
    Returns (repo, tmp, {phase: train key}, {phase: drafter.pt})."""
    if not (BIN / "torchrun").exists() or not _loopback_namespaces():
        pytest.skip("needs torchrun and unprivileged namespaces (unshare --net --mount --uts --map-root-user)")
    tmp = tmp_path_factory.mktemp("loopback")
    repo = copy_repo(tmp / "repo")
    keys, upstream = {}, {}
    for phase, (train, res) in LOOPBACK_LAYOUTS.items():
        doc = {"description": f"two-node test layout {phase}",
               "defaults": {**LOOPBACK_BASE, "train": {**LOOPBACK_BASE["train"], **train},
                            **({"resources": {"train": res}} if res else {})},
               "runs": {"main": {}}, "datasets": [{"name": "synthetic_math", "n": 1}], "references": []}
        (repo / "configs" / "phases" / f"{phase}.yaml").write_text(yaml.safe_dump(doc))
        plan = json.loads(dflash(repo, "plan", phase, "--json").stdout)
        keys[phase] = next(r["key"] for r in plan if r["stage"] == "train")
        upstream.update({r["stage"]: r["key"] for r in plan if r["stage"] in ("target", "prepare", "tokenize")})
    assert len({keys[p] for p in ("lb_one_node", "lb_two_nodes", "lb_two_nodes_ray")}) == 1    # data parallel 2
    for stage in ("target", "prepare", "tokenize"):
        proc = dflash(repo, "stage", stage, upstream[stage])
        assert proc.returncode == 0, proc.stderr[-3000:]
    drafters = {}
    for phase in ("lb_one_proc", "lb_one_node"):
        out = _finish(_job(repo, tmp, phase, keys[phase], ["node0"], JOB + str(len(drafters))), 300)
        assert "train: resumed" not in out
        drafters[phase] = _keep(repo, tmp, keys[phase], phase)
    return repo, tmp, keys, drafters


def _job(repo: Path, tmp: Path, phase: str, key: str, nodes: list[str], job: str) -> subprocess.Popen:
    """`dflash launch train <key> --phase <phase>` as the batch step of Slurm job `job` on `nodes`."""
    import loopback_slurm

    state = tmp / f"job-{job}"
    state.mkdir()
    bin_dir = loopback_slurm.install(tmp / "slurm-bin")
    argv = loopback_slurm.job_argv([str(BIN / "dflash"), "launch", "train", key, "--phase", phase], nodes,
                                   state / "hosts")
    e = loopback_slurm.job_env(nodes, job, state, bin_dir, {**env(), **LOOPBACK_ENV})
    proc = subprocess.Popen(argv, cwd=repo, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.state = state
    return proc


def _finish(proc: subprocess.Popen, timeout: float, rc: int | None = 0) -> str:
    import loopback_slurm

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        loopback_slurm.kill_tree(proc.pid)
        raise AssertionError(f"timed out after {timeout} s:\n{proc.communicate()[0][-4000:]}") from None
    finally:
        if proc.poll() is None:
            loopback_slurm.kill_tree(proc.pid)
            proc.wait()
    if rc is not None:
        assert proc.returncode == rc, out[-4000:]
    return out


def _keep(repo: Path, tmp: Path, key: str, name: str) -> Path:
    """Move the finished train output aside (layouts of equal data parallelism share one key) and drop its
    checkpoints; returns the kept drafter.pt."""
    kept = tmp / "drafters" / name
    kept.parent.mkdir(exist_ok=True)
    shutil.move(repo / "results" / "train" / key, kept)
    shutil.rmtree(repo / "results" / "checkpoints" / f"train-{key}")
    return kept / "drafter.pt"


def _max_diff(a: Path, b: Path) -> float:
    import torch

    sa, sb = torch.load(a), torch.load(b)
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


# 2 nodes x 1 process and 1 node x 2 processes run the same arithmetic (gloo sums two values, which is
# order-free): bit for bit. One process accumulates the four micro-batch gradients itself, where two ranks each
# accumulate two and then average them in FSDP2's reduce-scatter: the same sum in another order, which differs in
# the last fp32 bit, and 12 AdamW steps carry that into the weights. Measured max |difference| 1.2e-7 (one ulp of
# the norm weights, ~1.0; 4.4e-8 on the linear weights, ~0.08).
ONE_PROC_ATOL = 1e-6


def test_two_nodes_torchrun_equals_one_node_and_resumes_after_a_node_is_killed(loopback):
    """The launcher's 2-node command (srun, one torchrun per node, c10d rendezvous on the first node) run as two
    nodes of a Slurm job on loopback: node1 is killed (its whole process tree) after the step-2 checkpoint, the job
    fails, a rerun resumes, and the drafter equals that of 1 node x 2 processes bit for bit (and of 1 process within
    fp32 reordering)."""
    import loopback_slurm

    repo, tmp, keys, refs = loopback
    key = keys["lb_two_nodes"]
    work = repo / "results" / "checkpoints" / f"train-{key}"
    proc = _job(repo, tmp, "lb_two_nodes", key, ["node0", "node1"], JOB + "2")
    deadline = time.time() + 180
    while not (work / "step-00000002" / "meta.json").is_file():
        assert proc.poll() is None and time.time() < deadline, _finish(proc, 10, rc=None)[-4000:]
        time.sleep(0.1)
    step = (proc.state / "step-0").read_text()                # the launcher's srun step, as generated
    assert step.startswith("torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=node0:")
    assert f"--rdzv-id={JOB}2 --no-python" in step and step.endswith(f"stage train {key}")
    loopback_slurm.kill_tree(proc.pid, signal.SIGSTOP)       # the job frozen first: it cannot finish before the kill
    for pid in (proc.state / "node1.pids").read_text().split():
        loopback_slurm.kill_tree(int(pid))
    loopback_slurm.kill_tree(proc.pid, signal.SIGCONT)
    out = _finish(proc, 120, rc=None)
    assert proc.returncode != 0, out[-4000:]
    assert not (repo / "results" / "train" / key / "provenance.json").exists()
    rerun = _finish(_job(repo, tmp, "lb_two_nodes", key, ["node0", "node1"], JOB + "3"), 300)
    assert "train: resumed from step" in rerun
    summary = json.loads((repo / "results" / "train" / key / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12 and 2 <= summary["resumed_from"] < 12
    steps = [json.loads(line)["step"] for line in open(repo / "results" / "train" / key / "metrics.jsonl")]
    assert steps == list(range(1, 13))
    got = _keep(repo, tmp, key, "two_nodes")
    assert _max_diff(got, refs["lb_one_node"]) == 0.0
    assert _max_diff(got, refs["lb_one_proc"]) <= ONE_PROC_ATOL


def test_two_nodes_ray_workers_on_both_nodes_equal_one_node(loopback):
    """The launcher's 2-node Ray script: the head on node0, `ray start --address` on node1 through srun, both on
    loopback in the job's network namespace; Ray Train places one worker on each node, and the drafter equals that of
    1 node x 2 torchrun processes bit for bit."""
    pytest.importorskip("ray.train", reason="Ray Train is the `ray` extra")
    repo, tmp, keys, refs = loopback
    key = keys["lb_two_nodes_ray"]
    proc = _job(repo, tmp, "lb_two_nodes_ray", key, ["node0", "node1"], JOB + "4")
    out = _finish(proc, 400)
    step = (proc.state / "step-0").read_text()
    assert step.startswith("ray start --address=127.0.0.1:") and "--block" in step
    prov = json.loads((repo / "results" / "train" / key / "provenance.json").read_text())["summary"]
    assert prov["launcher"] == "ray" and prov["ray_workers"] == 2 and prov["ray_nodes"] == 2, out[-3000:]
    assert sorted(p["hostname"] for p in prov["ray_placement"]) == ["node0", "node1"]
    got = _keep(repo, tmp, key, "two_nodes_ray")
    assert _max_diff(got, refs["lb_one_node"]) == 0.0
    assert _max_diff(got, refs["lb_one_proc"]) <= ONE_PROC_ATOL
    left = subprocess.run(["pgrep", "-f", commands.ray_temp_dir(JOB + "4")], capture_output=True, text=True).stdout
    assert not left.split(), left
