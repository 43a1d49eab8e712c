"""Phase configs: YAML floats, schema errors naming file and field, extends, runs, defaults."""

import json

import pytest
import yaml

from conftest import dflash, snakemake
from dflash.plan.config import (
    PHASES_DIR,
    ConfigError,
    explain,
    leaves,
    load_phase,
    load_yaml,
    phase_names,
    read_document,
)


def write(d, name, doc):
    (d / f"{name}.yaml").write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)


DATASETS = [{"name": "synthetic_math", "n": 2}]


def test_scientific_notation_is_a_float(tmp_path):
    write(tmp_path, "p", "defaults:\n  train: {lr: 1e-4, min_lr: 1E-5}\ndatasets: [{name: gsm8k}]\n")
    run = load_phase("p", tmp_path).runs["main"]
    assert run["train"]["lr"] == 1e-4 and isinstance(run["train"]["lr"], float)
    assert run["train"]["min_lr"] == 1e-5


def test_defaults_filled_and_runs_override(tmp_path):
    write(tmp_path, "base", {"defaults": {"train": {"lr": 1e-3}}, "runs": {"a": {}, "b": {"train": {"gamma": 3.0}}},
                             "datasets": DATASETS})
    ph = load_phase("base", tmp_path)
    assert set(ph.runs) == {"a", "b"}
    assert ph.runs["a"]["train"]["gamma"] == 7.0 and ph.runs["b"]["train"]["gamma"] == 3.0
    assert ph.runs["b"]["train"]["lr"] == 1e-3 and ph.runs["a"]["drafter"]["block_size"] == 16


def test_gamma_defaults_to_the_papers_value_for_the_block_size(tmp_path):
    write(tmp_path, "g", {"runs": {"b16": {}, "b10": {"drafter": {"block_size": 10}},
                                   "b8": {"drafter": {"block_size": 8}},
                                   "b12": {"drafter": {"block_size": 12}, "train": {"gamma": 6.0}}},
                          "datasets": DATASETS})
    runs = load_phase("g", tmp_path).runs
    assert [runs[r]["train"]["gamma"] for r in ("b16", "b10", "b8", "b12")] == [7.0, 5.0, 4.0, 6.0]


def test_extends_merges_defaults_and_inherits(tmp_path):
    write(tmp_path, "base", {"defaults": {"train": {"lr": 1e-3, "gamma": 5.0}}, "datasets": DATASETS,
                             "references": ["zlab_readme"]})
    write(tmp_path, "child", {"extends": "base", "defaults": {"train": {"gamma": 3.0}}})
    ph = load_phase("child", tmp_path)
    assert ph.runs["main"]["train"]["lr"] == 1e-3 and ph.runs["main"]["train"]["gamma"] == 3.0
    assert ph.datasets[0]["name"] == "synthetic_math" and ph.references == ["zlab_readme"]
    assert ph.chain[0].endswith("child.yaml") and ph.chain[1].endswith("base.yaml")


@pytest.mark.parametrize("doc, message", [
    ({"runs": {"R03": {"train": {"lr": "fast"}}}}, "p.yaml: runs.R03.train.lr: expected number"),
    ({"defaults": {"train": {"lrr": 1.0}}}, "p.yaml: defaults.train: unknown key 'lrr'"),
    ({"defaults": {"train": {"schedule": "cos"}}}, "p.yaml: defaults.train.schedule: expected one of"),
    ({"defaults": {"drafter": {"block_size": 1}}}, "p.yaml: defaults.drafter.block_size:"),
    ({"datasets": [{"n": 3}]}, "p.yaml: datasets.0: 'name' is required"),
    ({"colour": 1}, "p.yaml: (top level): unknown key 'colour'"),
    ({"defaults": {"train": {"lr": 1.0e-4, "min_lr": 1.0e-3}}}, "runs.main.train.min_lr: must be <="),
    ({"extends": "nope"}, "p.yaml: extends: phase file"),
    ({"runs": {"a": {"extends": "b"}}}, "p.yaml: runs.a.extends: 'b' is not a run of this phase (runs: a)"),
    ({"runs": {"a": {"extends": "b"}, "b": {"extends": "a"}}}, "p.yaml: runs.b.extends: cycle a -> b -> a"),
    ({"defaults": {"extends": "a"}}, "p.yaml: defaults.extends: only a run (under runs:) extends another run"),
    ({"defaults": {"target": {"synthetic": {"num_layers": 6}}, "drafter": {"target_layer_ids": [1, 5]}}},
     "p.yaml: runs.main.drafter.target_layer_ids: [1, 5] include layer 5, the target's last: training reads it "
     "before the final norm"),
    ({"defaults": {"target": {"synthetic": {"num_layers": 6}}, "drafter": {"target_layer_ids": [1, 6]}}},
     "p.yaml: runs.main.drafter.target_layer_ids: [1, 6] must be distinct layers of the 6-layer target"),
    ({"defaults": {"drafter": {"block_size": 12}}},
     "p.yaml: runs.main.train.gamma: required for drafter.block_size 12 (the DFlash paper gives gamma for block "
     "sizes 8, 10, 16 only)"),
])
def test_bad_config_names_file_and_field(tmp_path, doc, message):
    write(tmp_path, "p", {"datasets": DATASETS, **doc})
    with pytest.raises(ConfigError) as e:
        load_phase("p", tmp_path)
    assert message in str(e.value)


def test_a_run_extends_another_run_of_its_phase(tmp_path):
    write(tmp_path, "p", {"defaults": {"train": {"lr": 1e-3}}, "datasets": DATASETS,
                          "runs": {"long": {"train": {"epochs": 5, "lr": 2e-3}},
                                   "long_wsd": {"extends": "long", "train": {"schedule": "wsd"}}}})
    runs = load_phase("p", tmp_path).runs
    assert (runs["long_wsd"]["train"]["epochs"], runs["long_wsd"]["train"]["lr"]) == (5, 2e-3)
    assert runs["long_wsd"]["train"]["schedule"] == "wsd" and "extends" not in runs["long_wsd"]
    where = explain("p", tmp_path)["long_wsd"]
    assert where["train.epochs"][1].endswith("p.yaml runs.long") and where["train.schedule"][1].endswith(
        "p.yaml runs.long_wsd")


def test_show_names_where_each_value_comes_from(repo):
    proc = dflash(repo, "show", "phase_k", "--run", "P2-WSD", "--json")
    assert proc.returncode == 0, proc.stderr
    got = {p: (v["value"], v["from"]) for p, v in json.loads(proc.stdout)["P2-WSD"].items()}
    assert got["train.schedule"] == ("wsd", "configs/phases/phase_k.yaml runs.P2-WSD")
    assert got["data.sources"][1] == "configs/phases/phase_k.yaml runs.P2-baseline"      # through the run's extends
    assert got["train.min_lr"] == (6e-05, "configs/phases/phase_h.yaml defaults")
    assert got["train.lr"] == (6e-4, "configs/phases/qwen3_8b.yaml defaults")
    assert got["train.seed"] == (0, "schema default")
    assert dflash(repo, "show", "smollm2", "--json").returncode == 0
    text = dflash(repo, "show", "phase_g").stdout
    assert text.startswith("phase phase_g: configs/phases/phase_g.yaml extends configs/phases/qwen3_8b.yaml\n")
    assert any(line.split()[:2] == ["train.grad_accum:", "4"] and
               line.endswith("# configs/phases/phase_g.yaml defaults") for line in text.splitlines())


def test_phase_files_state_only_what_differs():
    """A phase file sets no value its base phase already has; a run sets no value its phase's defaults (or the run
    it extends) already give it."""
    restated = []
    for name in phase_names():
        raw = load_yaml(PHASES_DIR / f"{name}.yaml") or {}
        if "extends" in raw:
            base = leaves(read_document(raw["extends"], PHASES_DIR)[0].get("defaults", {}))
            restated += [f"{name} defaults.{p}" for p, v in leaves(raw.get("defaults") or {}).items()
                         if p in base and base[p] == v]
        merged = read_document(name, PHASES_DIR)[0]
        defaults = leaves(merged.get("defaults", {}))
        for run, override in (raw.get("runs") or {}).items():
            given = dict(defaults)
            if (override or {}).get("extends"):
                given.update(leaves({k: v for k, v in raw["runs"][override["extends"]].items() if k != "extends"}))
            restated += [f"{name} runs.{run}.{p}" for p, v in leaves(override or {}).items()
                         if p != "extends" and p in given and given[p] == v]
    assert not restated


def test_extends_cycle(tmp_path):
    write(tmp_path, "a", {"extends": "b", "datasets": DATASETS})
    write(tmp_path, "b", {"extends": "a"})
    with pytest.raises(ConfigError, match="cycle"):
        load_phase("a", tmp_path)


def test_snakemake_refuses_bad_config_and_creates_nothing(repo):
    """The broken phase cannot run and says why; other phases still plan (a running workflow survives an edit to
    another phase file), with the error shown as a warning."""
    bad = repo / "configs" / "phases" / "phase_bad.yaml"
    bad.write_text("extends: smoke\nruns:\n  R03:\n    train: {lr: fast}\n")
    proc = snakemake(repo, "--cores", "1", "phase_bad", check=False)
    assert proc.returncode != 0
    assert "configs/phases/phase_bad.yaml: runs.R03.train.lr: expected number" in proc.stdout + proc.stderr
    assert not (repo / "results").exists()
    other = snakemake(repo, "-n", "smoke")
    assert "warning: phase left out of this workflow: configs/phases/phase_bad.yaml" in other.stderr
    cli = dflash(repo, "plan", "phase_bad")
    assert cli.returncode == 2 and "runs.R03.train.lr: expected number" in cli.stderr
