"""User mistakes that could destroy work, run a command or pass unnoticed: each case fails clearly (or is
harmless), with nothing partial left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, dflash, env, snakemake
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.training.checkpoints import find_checkpoint

SMOKE = "configs/phases/smoke.yaml"


def _keys(repo: Path, phase: str = "smoke") -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        plan = build({phase: load_phase(phase)}).plans[phase]["main"]
    finally:
        os.chdir(cwd)
    return plan.keys


def _phase(repo: Path, name: str, text: str) -> Path:
    path = repo / "configs" / "phases" / f"{name}.yaml"
    path.write_text(text)
    return path


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dflash: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- 1. gc never touches the work of a live process -------------------------------------------------------------

def test_gc_while_a_stage_runs_keeps_its_work(repo):
    key = _keys(repo)["target"]                   # pretraining the smoke target takes a while: time to run gc
    job = subprocess.Popen([str(BIN / "dflash"), "stage", "target", key], cwd=repo, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tmp = repo / "results" / "target" / f".tmp-{key}-{job.pid}"
    try:
        deadline = time.time() + 120
        while not tmp.is_dir() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert tmp.is_dir(), "the stage never started its temporary directory"
        stale = repo / "results" / "target" / f".tmp-{key}-999999999"          # a killed job's leftover
        stale.mkdir()
        gc = dflash(repo, "gc", "--delete")
        assert gc.returncode == 0, gc.stderr
        assert tmp.is_dir() and f"skipped       {tmp.relative_to(repo)}: process {job.pid}" in gc.stdout
        assert not stale.exists()
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert "nothing unreferenced" not in dflash(repo, "gc").stdout              # the dead job's directory now goes


def test_gc_skips_the_outputs_a_running_workflow_locked(repo):
    orphan = repo / "results" / "train" / "0123456789ab"
    orphan.mkdir(parents=True)
    (orphan / "drafter.pt").write_text("work of another checkout's running workflow")
    locks = repo / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(f"{orphan / 'provenance.json'}\n")
    out = dflash(repo, "gc", "--delete").stdout
    assert orphan.is_dir() and "a running workflow has locked its stage output" in out
    (locks / "0.output.lock").unlink()
    dflash(repo, "gc", "--delete")
    assert not orphan.exists()


# ---- 2. phase names reach no shell, never clash with a rule -----------------------------------------------------

def test_hostile_phase_file_name_runs_nothing(repo):
    _phase(repo, "x&touch PWNED", (repo / SMOKE).read_text())
    for args in (["-n", "x&touch PWNED"], ["--cores", "1", "x&touch PWNED"]):
        proc = snakemake(repo, *args, check=False)
        assert proc.returncode != 0
        assert "configs/phases/x&touch PWNED.yaml: the phase name" in proc.stderr
    assert not (repo / "PWNED").exists()
    assert "the phase name 'x&touch PWNED'" in _one_line_error(dflash(repo, "plan", "x&touch PWNED"))


def test_phase_named_like_a_rule_is_named_and_the_rest_still_plans(repo):
    _phase(repo, "train", (repo / SMOKE).read_text())
    proc = snakemake(repo, "-n", "smoke")                                      # the other phases still work
    assert "configs/phases/train.yaml: the phase name 'train' (the file name) is a rule of the workflow" in proc.stderr
    assert "is a rule of the workflow" in _one_line_error(dflash(repo, "plan", "train"))


# ---- 3. / 4. content known before running is checked at plan time ------------------------------------------------

@pytest.mark.parametrize("datasets, message", [
    ("[{name: gsm8kk}]", "datasets.0.name: unknown dataset 'gsm8kk'"),
    ("[{name: gsm8k, n: 12}, {name: gsm8k, n: 5}]", "datasets.1: 'gsm8k' is listed twice (also datasets.0)"),
    ("[{name: gsm8k, path: no/such/file.jsonl}]", "datasets.0.path: no/such/file.jsonl not found"),
    ("[{name: gsm8k, path: empty.jsonl}]", "datasets.0.path: empty.jsonl is empty"),
])
def test_bad_dataset_entries_fail_planning(repo, datasets, message):
    (repo / "empty.jsonl").write_text("")
    text = (repo / SMOKE).read_text().split("datasets:")[0] + f"datasets: {datasets}\nreferences: []\n"
    _phase(repo, "mine", text.replace("exclude_benchmarks: true", "exclude_benchmarks: false"))
    assert f"configs/phases/mine.yaml: {message}" in _one_line_error(dflash(repo, "plan", "mine"))


def test_missing_training_data_file_fails_planning(repo):
    _phase(repo, "mine", (repo / SMOKE).read_text().replace(
        "sources: [{kind: synthetic, n: 900}]", "sources: [{kind: jsonl, path: data/missing.jsonl}]"))
    line = _one_line_error(dflash(repo, "plan", "mine"))
    assert "configs/phases/mine.yaml: runs.main.data.sources.0.path: data/missing.jsonl not found" in line


def test_duplicate_yaml_keys_are_refused_with_their_lines(repo):
    _phase(repo, "mine", (repo / SMOKE).read_text() + "references: [zlab]\n")
    line = _one_line_error(dflash(repo, "plan", "mine"))
    assert "configs/phases/mine.yaml: not valid YAML: duplicate key 'references'" in line and "line" in line


# ---- 5. a stage checks the files it reads ------------------------------------------------------------------------

def test_a_changed_upstream_file_stops_the_stage_naming_it(repo):
    keys = _keys(repo)
    assert dflash(repo, "stage", "prepare", keys["prepare"]).returncode == 0
    data = repo / "results" / "prepare" / keys["prepare"] / "conversations.jsonl"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1                                                               # one flipped bit
    data.write_bytes(bytes(raw))
    line = _one_line_error(dflash(repo, "stage", "regenerate", keys["regenerate"]))
    assert f"input results/prepare/{keys['prepare']}/conversations.jsonl changed since its stage wrote it" in line
    assert "rerun its prepare stage" in line
    assert not (repo / "results" / "regenerate" / keys["regenerate"]).exists()


def test_a_stage_records_the_checksums_of_the_files_it_read(smoke_repo):
    keys = _keys(smoke_repo)
    prov = json.loads((smoke_repo / "results" / "tokenize" / keys["tokenize"] / "provenance.json").read_text())
    up = json.loads((smoke_repo / "results" / "regenerate" / keys["regenerate"] / "provenance.json").read_text())
    assert prov["inputs"][f"regenerate/{keys['regenerate']}/conversations.jsonl"] == \
        up["outputs"]["conversations.jsonl"]


# ---- 6. a stage job survives a broken phase file elsewhere -------------------------------------------------------

def test_a_broken_unrelated_phase_is_a_warning_once_not_a_stage_failure(repo):
    """Snakemake warns once per run; the stage job neither fails nor repeats the warning in its log."""
    _phase(repo, "other", "defaults: {train: {lr: fast}}\n")
    proc = dflash(repo, "stage", "prepare", _keys(repo)["prepare"])
    assert proc.returncode == 0, proc.stderr
    assert "other.yaml" not in proc.stderr
    warned = snakemake(repo, "-n", "smoke").stderr
    assert warned.count("phase left out of this workflow: configs/phases/other.yaml") == 1


# ---- 8. data errors name file and line; user errors are one line -------------------------------------------------

def test_malformed_training_data_names_file_and_line(repo):
    data = repo / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops\n')
    _phase(repo, "mine", (repo / SMOKE).read_text().replace(
        "sources: [{kind: synthetic, n: 900}]", "sources: [{kind: jsonl, path: data/train.jsonl}]"))
    key = _keys(repo, "mine")["prepare"]
    line = _one_line_error(dflash(repo, "stage", "prepare", key))
    assert "data/train.jsonl, row 2 (line 2): invalid JSON" in line


def test_corrupt_checkpoint_meta_is_skipped_like_a_corrupt_checkpoint(tmp_path):
    good, bad = tmp_path / "step-00000010", tmp_path / "step-00000020"
    for d in (good, bad):
        d.mkdir()
    (good / "meta.json").write_text(json.dumps({"files": {}, "step": 10, "invalid_steps": 0}))
    (bad / "meta.json").write_text('{"files": {"__0_0.distcp"')
    seen = []
    assert find_checkpoint(tmp_path, seen.append) == good
    assert "unreadable meta.json" in seen[0] and "step-00000020" in seen[0]
