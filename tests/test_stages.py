"""Stage runner: missing inputs fail clearly, failures leave no partial output, outputs carry provenance."""

import os

import pytest

from conftest import dflash
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.results import provenance
from dflash.stages import runner


@pytest.fixture
def in_repo(repo):
    old = os.getcwd()
    os.chdir(repo)
    yield repo
    os.chdir(old)


def test_missing_input_is_named_and_nothing_written(in_repo):
    key = build({"smoke": load_phase("smoke")}).plans["smoke"]["main"].keys["train"]
    proc = dflash(in_repo, "stage", "train", key)
    assert proc.returncode == 2
    assert "input results/tokenize/" in proc.stderr and "is missing or incomplete" in proc.stderr
    assert not (in_repo / "results" / "train" / key).exists()


def test_failing_stage_leaves_no_partial_output(in_repo, monkeypatch):
    reg = build({"smoke": load_phase("smoke")})
    key = reg.plans["smoke"]["main"].keys["prepare"]

    def boom(ctx):
        (ctx.out / "conversations.jsonl").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr("dflash.stages.prepare.run", boom)
    (in_repo / "results" / "prepare" / key).mkdir(parents=True)        # the placeholder Snakemake makes
    with pytest.raises(RuntimeError):
        runner.run(reg, "prepare", key)
    assert not (in_repo / "results" / "prepare" / key).exists()
    assert not list((in_repo / "results" / "prepare").glob(".tmp-*"))


def test_unknown_key(in_repo):
    proc = dflash(in_repo, "stage", "train", "0123456789ab")
    assert proc.returncode == 2 and "no train stage with key 0123456789ab" in proc.stderr


def test_recorded_command_names_no_path_outside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(tmp_path / ".venv" / "bin" / "dflash"), "stage", "train", "0123456789ab"])
    assert provenance.command_line() == [".venv/bin/dflash", "stage", "train", "0123456789ab"]
    monkeypatch.setattr("sys.argv", ["/opt/elsewhere/bin/dflash", "report", "smoke"])
    assert provenance.command_line() == ["dflash", "report", "smoke"]
