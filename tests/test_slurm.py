"""The smoke phase through `snakemake --profile slurm` on a real Slurm cluster (marked `slurm`).

Every job must go through sbatch (Slurm writes one log per job), and the run must end with the same stage keys and
the same tau table as the local smoke run. `.ci/run` starts a one-node cluster (no accounting, so job status comes
from squeue as the profile says) where it runs as root with apt; elsewhere the test skips.
"""

from __future__ import annotations

import ast
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, ENGINE_RULE, dflash, env, job_counts

pytestmark = pytest.mark.slurm

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def _slurm_up() -> str | None:
    """None if a Slurm controller answers and has a usable node, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm client (sbatch, sinfo) on PATH"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"no Slurm controller answers: {proc.stderr.strip()[:200]}"
    if not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"no usable Slurm node (states: {proc.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, request):
    """A clone of the local smoke run's repository copy (the same commit, so the same code and phase files) after
    `snakemake --profile slurm smoke`."""
    why = _slurm_up()
    if why:
        pytest.skip(f"{why}; .ci/run starts a one-node cluster where it runs as root with apt")
    smoke_repo = request.getfixturevalue("smoke_repo")             # the local run (shared with the e2e tests)
    base = tmp_path_factory.mktemp("slurm")
    repo = base / "repo"
    subprocess.run(["git", "clone", "-q", str(smoke_repo), str(repo)], check=True, capture_output=True)
    e = {**env(), "XDG_CONFIG_HOME": str(base / "config")}
    subprocess.run([str(BIN / "dflash"), "install-profiles"], cwd=repo, env=e, check=True, capture_output=True)
    t0 = time.time()
    proc = subprocess.run([str(BIN / "snakemake"), "--profile", "slurm", "smoke",
                           "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs"],
                          cwd=repo, env=e, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    (base / "snakemake.log").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    return repo, out, time.time() - t0, smoke_repo


def test_every_job_went_through_sbatch(slurm_run):
    repo, out, seconds, _ = slurm_run
    print(f"smoke through Slurm: {seconds:.0f} s")
    counts = job_counts(out)
    assert counts.pop("smoke") == 1                                    # the phase target is a local rule
    submitted = SUBMITTED.findall(out)
    assert len(submitted) == sum(counts.values()), (counts, submitted)
    assert len({jobid for _, jobid, _ in submitted}) == len(submitted)
    by_rule: dict[str, int] = {}
    for _, jobid, log in submitted:
        log = Path(log)
        assert log.is_file() and log.name == f"{jobid}.log"           # written by Slurm for this job id
        # .snakemake/slurm_logs/rule_<rule>/[<wildcards>/]<jobid>.log: an engine rule has no wildcards
        rule = next(part for part in log.parts if part.startswith("rule_")).removeprefix("rule_")
        text = log.read_text()
        assert f"localrule {rule}:" in text and f"(Rule: {rule})" in text, text[-2000:]
        m = ENGINE_RULE.match(rule)                                     # an engine job counts under its stage
        stage = m.group(1) if m else rule
        by_rule[stage] = by_rule.get(stage, 0) + 1
    assert by_rule == counts


def _plan(repo: Path) -> list[tuple]:
    rows = json.loads(dflash(repo, "plan", "smoke", "--json").stdout)
    assert all(r["exists"] for r in rows)
    return sorted((r["run"], r["stage"], r.get("dataset", ""), r["key"]) for r in rows)


def _table(repo: Path, name: str) -> tuple[list[str], dict[tuple, dict]]:
    with open(repo / "results" / "reports" / "smoke" / "tables" / name) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    key_cols = [c for c in ("run", "dataset") if c in reader.fieldnames]
    return reader.fieldnames, {tuple(r[c] for c in key_cols): r for r in rows}


def test_same_keys_and_tables_as_local(slurm_run):
    repo, _, _, smoke_repo = slurm_run
    assert _plan(repo) == _plan(smoke_repo)
    stage_dirs = {p.parent.relative_to(repo / "results").as_posix()
                  for p in (repo / "results").glob("*/*/provenance.json")}
    assert stage_dirs == {p.parent.relative_to(smoke_repo / "results").as_posix()
                          for p in (smoke_repo / "results").glob("*/*/provenance.json")}
    for name in ("tau.csv", "speedup.csv", "training.csv"):
        cols, rows = _table(repo, name)
        local_cols, local_rows = _table(smoke_repo, name)
        assert cols == local_cols and rows.keys() == local_rows.keys(), name
    _, rows = _table(repo, "tau.csv")
    _, local_rows = _table(smoke_repo, "tau.csv")
    for k, row in rows.items():                                       # deterministic on CPU: equal, not close
        for col in ("tau", "tau_token_weighted", "tau_no_bonus", "n_requests"):
            assert row[col] == local_rows[k][col], (k, col)


def test_torchrun_launch_inside_a_gpu_allocation(tmp_path):
    """What the train rule runs for `gpus: 2`, inside a real 2-GPU allocation and with the environment the executor's
    job step leaves (SLURM_* stripped but the job id): one rank per GPU, both GPUs visible to every rank; and the
    node list that a multi-node launch needs still comes from scontrol."""
    why = _slurm_up()
    if why:
        pytest.skip(f"{why}; .ci/run starts a one-node cluster where it runs as root with apt")
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout
    if "gpu" not in gres:
        pytest.skip(f"the cluster has no GPU GRES ({gres.strip()})")
    stub = tmp_path / "stage"
    stub.write_text("#!/usr/bin/env bash\n"
                    f'echo "$RANK/$WORLD_SIZE gpus=$CUDA_VISIBLE_DEVICES $*" >> {tmp_path}/ranks\n')
    stub.chmod(0o755)
    job = tmp_path / "job.py"
    job.write_text(f"""import os, subprocess
from dflash.launch import commands as launch
keep = {{"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST"}}
env = {{k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k in keep}}
print("nodes", launch.allocation_nodes(env))
launch.dflash_exe = lambda: {str(stub)!r}
argv = launch.launch_command("train", "k", {{"gpus": 2, "cpus_per_gpu": 1}}, env=env)
argv[0] = {str(BIN / "torchrun")!r}
subprocess.run(argv, env={{**env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}}, check=True)
""")
    out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", "--wait", "-o", str(out), "--gpus=2", "--nodes=1",
                           "--cpus-per-gpu=1", "--mem", "2000", "-t", "10", "--wrap",
                           f"{sys.executable} {job}"], capture_output=True, text=True, timeout=600, env=env())
    log = out.read_text() if out.is_file() else ""
    assert proc.returncode == 0, proc.stderr + log
    nodes = next(line for line in log.splitlines() if line.startswith("nodes "))
    assert len(ast.literal_eval(nodes[len("nodes "):])) == 1, log                # the one node of this allocation
    assert sorted((tmp_path / "ranks").read_text().splitlines()) == ["0/2 gpus=0,1 stage train k",
                                                                    "1/2 gpus=0,1 stage train k"]
