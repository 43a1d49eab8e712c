"""Issue 21, a fresh clone is self-contained: local data is named under one data root (`data:<path>`,
DFLASH_DATA / `--config data_root=DIR`), a phase whose data is missing is unavailable (not an error for everything
else), and stage keys hash a `data:` path as the former `../shared/data/<path>` spelling."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURE_DATA, ROOT, snakemake
from dflash import cli
from dflash.data import root as data_root
from dflash.data.benchmarks import load_prompts
from dflash.plan import availability, rehearsal
from dflash.plan.config import load_phase, phase_names
from dflash.plan.keys import load_registry, stage_key
from dflash.stages import prepare

PHASES = phase_names(ROOT / "configs" / "phases")
ALL = [*PHASES, *(rehearsal.PREFIX + p for p in PHASES)]


def test_a_data_path_hashes_as_its_former_spelling():
    cfg = {"data": {"sources": [{"kind": "jsonl", "path": "data:gsm8k/train.jsonl"}]}}
    old = {"data": {"sources": [{"kind": "jsonl", "path": "../shared/data/gsm8k/train.jsonl"}]}}
    assert stage_key("prepare", cfg, {}) == stage_key("prepare", old, {})
    plain = {"data": {"sources": [{"kind": "jsonl", "path": "gsm8k/train.jsonl"}]}}
    assert stage_key("prepare", cfg, {}) != stage_key("prepare", plain, {})
    prompt = {"tokenize": {"system_prompt": "data:gsm8k/train.jsonl"}}           # only paths are respelled
    assert data_root.key_form(prompt) == prompt
    record = {"rehearsal": {"dataset.path": [None, "data:gsm8k/test.jsonl"]}}
    assert data_root.key_form(record) == {"rehearsal": {"dataset.path": [None, "../shared/data/gsm8k/test.jsonl"]}}


def test_the_fixtures_hold_every_data_file_a_phase_or_rehearsal_names():
    assert (FIXTURE_DATA / "README.md").is_file()
    reg = load_registry(only=ALL)          # conftest points the data root at the fixtures
    assert {name: availability.missing(ph) for name, ph in reg.phases.items() if availability.missing(ph)} == {}
    assert any(data_root.is_rooted(ds.get("path")) for ph in reg.phases.values() for ds in ph.datasets)


def test_stages_read_data_paths_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv(data_root.ENV, str(FIXTURE_DATA))
    rows, inputs, _ = prepare._read_source({"kind": "jsonl", "path": "data:gsm8k/train.jsonl", "format": "gsm8k"})
    assert len(rows) == 6 and rows[0]["id"] == "gsm8k/train/0" and list(inputs) == ["data:gsm8k/train.jsonl"]
    prompts, meta = load_prompts({"name": "gsm8k", "n": 2, "seed": 0, "path": "data:gsm8k/test.jsonl"})
    assert len(prompts) == 2 and meta["source"] == "file:data:gsm8k/test.jsonl" and meta["sha256"]
    monkeypatch.setenv(data_root.ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"data\.sources: data:gsm8k/train\.jsonl is not in the data root "
                                                r".*nowhere/ \(it does not exist\); copy the files .*DFLASH_DATA"):
        prepare._read_source({"kind": "jsonl", "path": "data:gsm8k/train.jsonl", "format": "gsm8k"})
    with pytest.raises(FileNotFoundError, match=r"gsm8k: data:gsm8k/test\.jsonl is not in the data root"):
        load_prompts({"name": "gsm8k", "n": 2, "seed": 0, "path": "data:gsm8k/test.jsonl"})


def test_a_phase_without_its_data_is_unavailable_not_broken(repo, monkeypatch, capsys):
    """No data root: `dflash plan` refuses the phases that read local files, naming them and how to get them
    (exit 2); the others plan; gc runs and keeps the results of the unavailable ones; keys are the same."""
    monkeypatch.chdir(repo)
    keys = load_registry(only=["smollm2"]).plans["smollm2"]["regenerated"].keys
    monkeypatch.setenv(data_root.ENV, str(repo / "data"))                # the default, absent in a fresh clone
    assert load_registry(only=["smollm2"]).plans["smollm2"]["regenerated"].keys == keys
    assert cli.main(["plan", "smollm2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dflash: error: configs/phases/smollm2.yaml: phase smollm2 is unavailable here: 12 of its "
                          "local data files are not in the data root ") and len(err.splitlines()) == 1
    assert "data:gsm8k/train.jsonl" in err and "DFLASH_DATA=DIR" in err and "--config data_root=DIR" in err
    assert cli.main(["plan", "rehearsal/paper"]) == 2 and "data:alpaca/train.jsonl" in capsys.readouterr().err
    assert cli.main(["plan", "smoke"]) == 0
    kept = repo / "results" / "prepare" / keys["prepare"]
    stale = repo / "results" / "prepare" / "0123456789ab"
    for d in (kept, stale):
        d.mkdir(parents=True)
        (d / "provenance.json").write_text(json.dumps({}))
    capsys.readouterr()
    assert cli.main(["gc"]) == 0
    out = capsys.readouterr().out
    assert "results/prepare/0123456789ab" in out and keys["prepare"] not in out
    (repo / "data" / "gsm8k").mkdir(parents=True)                      # one file there: the others are still named
    (repo / "data" / "gsm8k" / "train.jsonl").write_text((FIXTURE_DATA / "gsm8k" / "train.jsonl").read_text())
    gone = availability.missing(load_phase("smollm2"))
    assert len(gone) == 11 and "data:gsm8k/train.jsonl" not in gone


def test_snakemake_refuses_an_unavailable_phase_and_takes_the_data_root_from_config(repo):
    proc = snakemake(repo, "-n", "smollm2", check=False, data=repo / "data")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "dflash: error: configs/phases/smollm2.yaml: phase smollm2 is unavailable here" in proc.stderr
    assert "phase left out" not in proc.stderr and proc.stderr.count("dflash: note") <= 1      # said once
    proc = snakemake(repo, "-n", "smollm2", "--config", f"data_root={FIXTURE_DATA}", data=repo / "data")
    assert "prepare" in proc.stdout and "unavailable" not in proc.stderr
