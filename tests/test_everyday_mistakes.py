"""Everyday mistakes against the DAG's promise (a stage reruns only when what it reads changes) and against the
results: another phase file, a publish into the wrong folder, a second writer, odd phase files, bad data files. Each
fails clearly (one line, exit 2) or is harmless, and nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, dflash, env, snakemake
from dflash import cli
from dflash.data.benchmarks import load_benchmark
from dflash.errors import DataError
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.processes import lock_holder, pid_alive, try_lock

SMOKE = "configs/phases/smoke.yaml"


def _keys(repo: Path, phase: str = "smoke") -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        return build({phase: load_phase(phase)}).plans[phase]["main"].keys
    finally:
        os.chdir(cwd)


def _phase(repo: Path, name: str, text: str | bytes) -> Path:
    path = repo / "configs" / "phases" / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error of a user mistake: exit 2, no traceback, stderr one line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dflash: error: "), proc.stderr[-2000:]
    return lines[0]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---- 1. another phase file that shares every stage reruns nothing -----------------------------------------------

def test_adding_a_phase_that_shares_every_stage_reruns_nothing(smoke_repo):
    """`a_copy` sorts before `smoke` and plans the same stages: which phase's resources a shared job uses is not
    what decides whether it reruns (neither train nor anything below it reruns, either way)."""
    copy = _phase(smoke_repo, "a_copy", (smoke_repo / SMOKE).read_text())
    try:
        proc = snakemake(smoke_repo, "-n", "smoke")
        assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    finally:
        copy.unlink()
    proc = snakemake(smoke_repo, "-n", "smoke")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


# ---- 2. publish never deletes what it did not write --------------------------------------------------------------

@pytest.fixture(scope="module")
def pub_repo(smoke_repo, tmp_path_factory):
    """A copy of the finished smoke repository (with the committed docs/results/smollm2 publication)."""
    dest = tmp_path_factory.mktemp("publish") / "repo"
    shutil.copytree(smoke_repo, dest, symlinks=True)
    shared = smoke_repo.parent / "shared"            # the smollm2 phase names ../shared/data files
    if shared.exists():
        (dest.parent / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return dest


def test_publish_refuses_the_results_tree_and_another_phases_publication(pub_repo):
    results = _files(pub_repo / "results")
    line = _one_line_error(dflash(pub_repo, "publish", "smoke", "results"))
    assert line == "dflash: error: results: is the results tree; publish elsewhere, e.g. docs/results/smoke"
    line = _one_line_error(dflash(pub_repo, "publish", "smoke", "results/reports/smoke"))
    assert "results/reports/smoke: is inside the results tree results" in line
    assert _files(pub_repo / "results") == results                  # no weights deleted, no omitted.json written

    other = pub_repo / "docs" / "results" / "smollm2"
    before = {f: (other / f).read_bytes() for f in _files(other)}
    line = _one_line_error(dflash(pub_repo, "publish", "smoke", "docs/results/smollm2"))
    assert "docs/results/smollm2: holds the publication of smollm2; publish smoke into a folder of its own, or pass " \
           "--force" in line
    assert {f: (other / f).read_bytes() for f in _files(other)} == before

    proc = dflash(pub_repo, "publish", "smoke", "docs/results/smollm2", "--force")    # beside it, nothing removed
    assert proc.returncode == 0, proc.stderr
    after = _files(other)
    assert set(before) <= after and "reports/smoke/report.md" in after
    assert all((other / f).read_bytes() == data for f, data in before.items() if f != "omitted.json")
    for phase in ("smollm2", "smoke"):
        proc = dflash(pub_repo, "audit", phase, "--results", "docs/results/smollm2")
        assert proc.returncode == 0, proc.stdout[-2000:]

    (pub_repo / "file").write_text("x")
    assert "file: exists and is not a folder" in _one_line_error(dflash(pub_repo, "publish", "smoke", "file"))


def test_republish_keeps_what_it_did_not_write_and_fails_whole(pub_repo):
    assert dflash(pub_repo, "publish", "smoke", "docs/results/smoke").returncode == 0
    pub = pub_repo / "docs" / "results" / "smoke"
    bench = next(pub.glob("bench/*"))
    stale = pub / "bench" / "0123456789ab"                         # a stage directory the publication no longer holds
    shutil.copytree(bench, stale)
    (bench / "notes.txt").write_text("mine\n")                     # a file of the user's inside a stage directory
    prov = json.loads((stale / "provenance.json").read_text())
    (stale / "provenance.json").write_text(json.dumps({**prov, "key": "0123456789ab"}))
    report = json.loads((pub / "reports" / "smoke" / "provenance.json").read_text())
    runs = report["upstream"]["runs"]
    runs["main"]["bench"]["old"] = "0123456789ab"                  # as if the previous publication held it
    (pub / "reports" / "smoke" / "provenance.json").write_text(json.dumps(report))
    assert dflash(pub_repo, "publish", "smoke", "docs/results/smoke").returncode == 0
    assert (bench / "notes.txt").read_text() == "mine\n"
    assert not stale.exists()

    before = {f: (pub / f).read_bytes() for f in _files(pub)}
    rec = pub_repo / "results" / bench.relative_to(pub) / "records.jsonl"
    original = rec.read_bytes()
    rec.write_bytes(original + b" ")
    try:
        assert "missing or changed" in _one_line_error(dflash(pub_repo, "publish", "smoke", "docs/results/smoke"))
    finally:
        rec.write_bytes(original)
    assert {f: (pub / f).read_bytes() for f in _files(pub)} == before
    assert not list(pub.parent.glob(".tmp-*"))


# ---- 3. one writer per stage instance; a job ends with its Snakemake ---------------------------------------------

def _wait_for_builder(root: Path, key: str, proc: subprocess.Popen, timeout: float = 180) -> int:
    """The pid that builds `root/.tmp-<key>-<pid>` once it appears."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(root.glob(f".tmp-{key}-*"))
        if found:
            return int(found[0].name.rpartition("-")[2])
        time.sleep(0.2)
    raise AssertionError(f"no builder of {key} appeared (exit {proc.poll()})")


def test_a_second_writer_fails_naming_the_first(repo):
    key = _keys(repo)["target"]                                     # pretraining the smoke target takes a while
    first = subprocess.Popen([str(BIN / "dflash"), "stage", "target", key], cwd=repo, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_builder(repo / "results" / "target", key, first)
        line = _one_line_error(dflash(repo, "stage", "target", key))
        assert f"target {key} is being built by process {first.pid} (lock results/.locks/target-{key}.lock)" in line
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    fd = try_lock(repo / "results" / ".locks" / f"target-{key}.lock")   # the kernel freed it with the process
    assert fd is not None
    os.close(fd)


def test_a_stage_job_ends_with_its_killed_snakemake(repo):
    """kill -9 of Snakemake alone: its stage job (behind the job's bash) ends too and frees its lock, so the rerun
    that the README describes never meets a second trainer."""
    key = _keys(repo)["target"]
    smk = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", f"results/target/{key}/provenance.json"],
                           cwd=repo, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        job = _wait_for_builder(repo / "results" / "target", key, smk)
        os.kill(smk.pid, signal.SIGKILL)
        smk.wait()
        deadline = time.time() + 30                                 # loose guard: it ends well under a second
        while pid_alive(job) and time.time() < deadline:
            time.sleep(0.1)
        assert not pid_alive(job), "the stage job outlived its Snakemake"
    finally:
        if smk.poll() is None:
            os.kill(smk.pid, signal.SIGKILL)
    lock = repo / "results" / ".locks" / f"target-{key}.lock"
    fd = try_lock(lock)
    assert fd is not None, lock_holder(lock)
    os.close(fd)


# ---- 4. a phase file broken in ways a schema cannot see is left out, like a schema error --------------------------

BROKEN = {         # smoke.yaml with one fault: (text replaced, its replacement, the message)
    "p_nan": ("lr: 3.0e-3, min_lr", "lr: .nan, min_lr", "defaults.train.lr: nan is not a finite number"),
    "p_inf": ("lr: 3.0e-3, min_lr", "lr: .inf, min_lr", "defaults.train.lr: inf is not a finite number"),
    "p_big": ("lr: 3.0e-3, min_lr", "lr: 1e999, min_lr", "defaults.train.lr: inf is not a finite number"),
    "p_byte": ("CPU smoke", "CPU smok\udce9", "not UTF-8 text (byte 0xe9 on line 2)"),
    "p_null": ("  main: {}", "  main: {}\n  null: {}", "runs: key null is not a string (quote it)"),
    "p_int": ("  main: {}", "  1: {}\n  \"1\": {}", "runs: key 1 is not a string (quote it)"),
    "p_evil": ("description:", "extends: ../../../evil\ndescription:",
               "extends: '../../../evil' is not a phase name (a file of configs/phases"),
    "p_dup": ("references: []", "references: []\nreferences: []",
              "not valid YAML: duplicate key 'references' (first given on line 25) (line 26, column 1)"),
}


def test_broken_phase_files_are_left_out_with_one_line_each(repo):
    smoke = (repo / SMOKE).read_text()
    (repo.parent / "evil.yaml").write_text(smoke)                   # what `extends: ../../../evil` reached
    for name, (old, new, _) in BROKEN.items():
        assert old in smoke
        _phase(repo, name, smoke.replace(old, new, 1).encode("utf-8", "surrogateescape"))
    _phase(repo, "two\nlines", smoke)
    for name, (_, _, message) in BROKEN.items():
        assert f"configs/phases/{name}.yaml: {message}" in _one_line_error(dflash(repo, "plan", name)), name
    assert dflash(repo, "plan", "smoke").returncode == 0
    _one_line_error(dflash(repo, "gc"))                              # gc stays strict, in one line
    proc = snakemake(repo, "-n", "smoke")                           # the workflow leaves each out, one line each
    warnings = [line for line in proc.stderr.splitlines() if "phase left out of this workflow" in line]
    assert len(warnings) == len(BROKEN) + 1, proc.stderr[-3000:]
    assert any("configs/phases/two\\nlines.yaml: the phase name 'two\\nlines'" in w for w in warnings)
    assert "Traceback" not in proc.stderr


# ---- 5. names and local files that would fail late fail at plan time ----------------------------------------------

def test_overlong_names_and_unreadable_local_files_fail_planning(repo):
    smoke = (repo / SMOKE).read_text()
    name = "p" * 243
    _phase(repo, name, smoke)
    assert "the phase name (the file name) is 243 characters long; at most 100" in \
        _one_line_error(dflash(repo, "plan", name))
    (repo / "configs" / "phases" / f"{name}.yaml").unlink()
    _phase(repo, "longrun", smoke.replace("runs:\n  main: {}", "runs:\n  " + "r" * 256 + ": {}"))
    assert "runs: the run name rrrrrrrrrrrrrrrrrrrr... is 256 characters long; at most 100" in \
        _one_line_error(dflash(repo, "plan", "longrun"))

    (repo / "lcb").mkdir()
    (repo / "lcb" / "notes.txt").write_text("not a benchmark file\n")
    (repo / "blank.jsonl").write_text("\n  \n\t\n")
    base = smoke.split("datasets:")[0].replace("exclude_benchmarks: true", "exclude_benchmarks: false")
    _phase(repo, "folder", base + "datasets: [{name: livecodebench, path: lcb}]\n")
    assert "configs/phases/folder.yaml: datasets.0.path: lcb is a folder without any of the files read from it: " \
           "test.jsonl, test2.jsonl" in _one_line_error(dflash(repo, "plan", "folder"))
    _phase(repo, "blank", base + "datasets: [{name: gsm8k, path: blank.jsonl}]\n")
    assert "configs/phases/blank.yaml: datasets.0.path: blank.jsonl holds only whitespace" in \
        _one_line_error(dflash(repo, "plan", "blank"))
    _phase(repo, "blanksrc", smoke.replace("sources: [{kind: synthetic, n: 900}]",
                                           "sources: [{kind: jsonl, path: blank.jsonl}]"))
    assert "runs.main.data.sources.0.path: blank.jsonl holds only whitespace" in \
        _one_line_error(dflash(repo, "plan", "blanksrc"))


# ---- 6. user mistakes are one line and exit 2; a bug keeps its traceback ------------------------------------------

def test_bad_training_data_is_one_line_naming_file_and_line(repo):
    data = repo / "data" / "train.jsonl"
    data.parent.mkdir()
    _phase(repo, "mine", (repo / SMOKE).read_text().replace(
        "sources: [{kind: synthetic, n: 900}]", "sources: [{kind: jsonl, path: data/train.jsonl}]"))
    good = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    for raw, message in ((good + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n',
                          "data/train.jsonl, row 2 (line 2): not UTF-8 text (byte 0xe9 at column 47)"),
                         (good + b'{"messages": "hello"}\n',
                          "data/train.jsonl, row 2 (line 2): not a record of format 'messages' (expected "
                          '{"messages": [{"role": ..., "content": ...}, ...]})')):
        data.write_bytes(raw)
        assert message in _one_line_error(dflash(repo, "stage", "prepare", _keys(repo, "mine")["prepare"]))


def test_garbage_parquet_names_the_file(tmp_path):
    bad = tmp_path / "gsm8k.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=f"{bad}: not a readable parquet file"):
        load_benchmark("gsm8k", n=1, path=bad)


def test_truncated_provenance_and_bad_compare_inputs_are_one_line(repo):
    keys = _keys(repo)
    assert dflash(repo, "stage", "prepare", keys["prepare"]).returncode == 0
    prov = repo / "results" / "prepare" / keys["prepare"] / "provenance.json"
    prov.write_text(prov.read_text()[:100])
    where = f"results/prepare/{keys['prepare']}/provenance.json: unreadable"
    assert where in _one_line_error(dflash(repo, "stage", "regenerate", keys["regenerate"]))
    assert where in _one_line_error(dflash(repo, "provenance", f"results/prepare/{keys['prepare']}"))

    for name, text in (("a", '{"prompt_id": "x", "turn": 0, "accept_lengths": [1]}\n{oops\n'),
                       ("b", '{"turn": 0, "accept_lengths": [1]}\n')):
        (repo / name).mkdir()
        (repo / name / "records.jsonl").write_text(text)
    assert "a/records.jsonl, row 2 (line 2): invalid JSON" in _one_line_error(dflash(repo, "compare", "a", "b"))
    (repo / "a" / "records.jsonl").write_text('{"prompt_id": "x", "turn": 0, "accept_lengths": [1]}\n')
    assert "b/records.jsonl, row 1 (line 1): not a bench record (needs prompt_id, turn and accept_lengths)" in \
        _one_line_error(dflash(repo, "compare", "a", "b"))

    line = _one_line_error(dflash(repo, "audit", "smoke"))
    assert "results/reports/smoke: no report (no provenance.json); build it with `snakemake smoke`" in line


def test_a_closed_pipe_is_no_traceback(repo):
    proc = subprocess.Popen([str(BIN / "dflash"), "stages"], cwd=repo, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()                                             # `dflash stages | head -0`
    err = proc.stderr.read().decode()
    assert proc.wait() == cli.SIGPIPE_EXIT and err == ""


def test_a_key_error_inside_a_command_is_a_bug_with_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "load_registry", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["plan", "smoke"])


def test_an_unknown_stage_key_is_a_user_error(repo):
    assert "no train stage with key 0123456789ab" in _one_line_error(dflash(repo, "stage", "train", "0123456789ab"))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
