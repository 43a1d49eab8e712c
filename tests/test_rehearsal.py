"""Issue 14, rehearsals: a phase run as `rehearsal/<phase>` with exactly its DAG, runs and options, the substitutions
of configs/rehearsal.yaml recorded in every stage's key and provenance; `paper` and the two-run sweep `phase_e`
rehearsed end to end through Snakemake, then audited."""

from __future__ import annotations

import csv
import json
import time

import pytest
import yaml

from conftest import SHARED_DATA, copy_repo, dflash, job_counts, snakemake
from dflash.modeling import qwen3_tokenizer
from dflash.modeling.drafter import build_target_layer_ids
from dflash.plan import rehearsal
from dflash.plan.config import ConfigError, leaves, load_phase
from dflash.plan.keys import load_registry
from dflash.plan.paths import REHEARSAL_FILE
from dflash.plan.stages import BY_NAME
from dflash.stages import prepare

QWEN3_PHASES = ("qwen3_8b", *(f"phase_{c}" for c in "abcdefghijk"), "paper")
OVERLAY = yaml.safe_load(REHEARSAL_FILE.read_text())
DEPTH = OVERLAY["target"]["qwen3_offline"]["num_layers"]
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data folder at {SHARED_DATA}")


@pytest.fixture(scope="module")
def both():
    return load_registry(only=[*QWEN3_PHASES, *(rehearsal.PREFIX + p for p in QWEN3_PHASES)])


@pytest.mark.parametrize("name", QWEN3_PHASES)
def test_rehearsal_has_the_phase_dag_runs_and_datasets_and_its_own_keys(both, name):
    real, reh = both.plans[name], both.plans[rehearsal.PREFIX + name]
    left_out = both.phases[rehearsal.PREFIX + name].rehearsal["left_out"]
    assert list(reh) == [r for r in real if r not in left_out]                      # the same runs
    assert all("hub checkpoint" in why and both.phases[name].runs[r]["drafter"]["pretrained"]
               for r, why in left_out.items())                                    # only hub drafters (zlab)
    for run in reh:
        assert list(real[run].named()) == list(reh[run].named())                    # the same stages and datasets
        assert not set(real[run].pairs()) & set(reh[run].pairs())                   # no shared output
    assert both.reports[name].dir != both.reports[rehearsal.PREFIX + name].dir


@pytest.mark.parametrize("name", [*QWEN3_PHASES, "smoke", "smollm2"])
def test_every_substitution_is_recorded_in_the_stages_that_read_it(both, name):
    reg = both if name in QWEN3_PHASES else load_registry(only=[name, rehearsal.PREFIX + name])
    real, reh = reg.phases[name], reg.phases[rehearsal.PREFIX + name]
    for run, plan in reg.plans[rehearsal.PREFIX + name].items():
        changed = {p for p, v in leaves(reh.runs[run]).items() if leaves(real.runs[run]).get(p, "absent") != v}
        changed |= set(leaves(real.runs[run])) - set(leaves(reh.runs[run]))
        recorded = {p for rec in reh.rehearsal["runs"][run].values() for p in rec}
        uncovered = {p for p in changed if not any(p == r or p.startswith(r + ".") or r.startswith(p + ".")
                                                   for r in recorded)}
        assert not uncovered
        assert all("rehearsal" not in reg.get(s, k).config for s, k in reg.plans[name][run].pairs())
        for stage, key in plan.pairs():
            inst = reg.get(stage, key)
            for path in inst.config["rehearsal"]:
                section = path.split(".")[0]
                assert section in inst.config or path == f"resources.{BY_NAME[stage].resources or stage}" or \
                    (section, stage) in (("resources", "train"), ("dataset", "bench")), (stage, path)


def test_qwen3_rehearsal_substitutions(both):
    reh = both.phases["rehearsal/phase_k"]
    r00 = reh.rehearsal["runs"]["R00"]
    assert r00["train"]["train.max_steps"] == [1000, OVERLAY["caps"]["train_steps"]]
    assert r00["drafter"] == {"drafter.target_layer_ids": [[1, 9, 17, 25, 33], None]}      # z-lab's rule, 8 layers
    assert r00["data"]["data.sources.0"][1]["path"] == "data:alpaca/train.jsonl"
    assert r00["data"]["data.sources.0"][1]["convert_from"] == "alpaca"
    assert reh.runs["R00"]["drafter"]["mask_token_id"] == 151669 and reh.runs["R00"]["target"]["kind"] == \
        "qwen3_offline"
    assert reh.rehearsal["datasets"]["livecodebench"]["dataset.path"] == [None, "data:livecodebench/test.jsonl"]
    assert {d["n"] for d in reh.datasets} == {OVERLAY["caps"]["prompts"]}
    plan = both.plans["rehearsal/phase_k"]["R00"]
    train = both.get("train", plan.keys["train"])
    assert train.config["rehearsal"]["train.num_anchors"] == [512, OVERLAY["caps"]["num_anchors"]]
    assert train.config["data_parallel"] == 1 and "resources.train" in train.config["rehearsal"]


def test_a_phase_mask_token_becomes_the_qwen3_mask_id():
    reg = load_registry(only=["rehearsal/smollm2"])
    run = reg.phases["rehearsal/smollm2"].runs["regenerated"]
    assert "mask_token" not in run["drafter"] and run["drafter"]["mask_token_id"] == qwen3_tokenizer.MASK_TOKEN_ID
    rec = reg.phases["rehearsal/smollm2"].rehearsal["runs"]["regenerated"]["drafter"]
    assert rec["drafter.mask_token"] == ["<empty_output>", None]


def test_the_overlay_values_are_part_of_the_keys(tmp_path):
    doc = yaml.safe_load(REHEARSAL_FILE.read_text())
    doc["caps"]["train_steps"] = 7
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(doc))
    before = load_registry(only=["rehearsal/phase_e"]).plans["rehearsal/phase_e"]["S1"]
    after = rehearsal.load("rehearsal/phase_e", overlay_path=tmp_path / "rehearsal.yaml")
    from dflash.plan.keys import build

    plan = build({after.name: after}).plans[after.name]["S1"]
    assert plan.keys["tokenize"] == before.keys["tokenize"] and plan.keys["train"] != before.keys["train"]
    real = load_registry(only=["phase_e"]).plans["phase_e"]["S1"]
    assert not set(real.pairs()) & (set(plan.pairs()) | set(before.pairs()))


def test_bad_overlay_names_file_and_field(tmp_path):
    doc = yaml.safe_load(REHEARSAL_FILE.read_text())
    doc["caps"]["train_steps"] = "many"
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"rehearsal\.yaml: caps\.train_steps: expected an integer"):
        rehearsal.load("rehearsal/phase_e", overlay_path=tmp_path / "rehearsal.yaml")
    del doc["stand_ins"]["mlabonne/open-perfectblend"]
    doc["caps"]["train_steps"] = 3
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"phase_e\.yaml: runs\.S1\.data\.sources\.0: no local stand-in for hub "
                                          r"dataset 'mlabonne/open-perfectblend'"):
        rehearsal.load("rehearsal/phase_e", overlay_path=tmp_path / "rehearsal.yaml")


def test_stand_in_records_are_converted_then_read_as_the_hub_format(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    want = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    for fmt in ("sharegpt", "messages", "alpaca"):
        rows, _, _ = prepare._read_source({"kind": "jsonl", "path": str(path), "format": fmt, "convert_from": "gsm8k"})
        assert rows[0]["messages"] == want, fmt


# ---------------------------------------------------------------------------------------------- end to end


CI_DATASETS = ["gsm8k", "livecodebench", "mt_bench"]       # math, code (its own prompt format), two-turn chat
CI_TRAIN_STEPS = 4


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    """paper and phase_e rehearsed by `snakemake --cores 2 paper phase_e --config rehearse=1` in a repo copy whose
    overlay keeps three of the ten benchmark sets and 4 training steps (issue 14 allows a reduced dataset list in CI;
    every set's loader is tested on the real files in test_benchmarks.py)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data folder at {SHARED_DATA}")
    base = tmp_path_factory.mktemp("rehearsal")
    repo = copy_repo(base / "repo")
    overlay = repo / "configs" / "rehearsal.yaml"
    doc = yaml.safe_load(overlay.read_text())
    doc["datasets"], doc["caps"]["train_steps"] = CI_DATASETS, CI_TRAIN_STEPS
    overlay.write_text(yaml.safe_dump(doc, sort_keys=False))
    t0 = time.time()
    proc = snakemake(repo, "--cores", "2", "paper", "phase_e", "--config", "rehearse=1", f"data_root={SHARED_DATA}")
    return repo, time.time() - t0, job_counts(proc.stdout + proc.stderr)


@needs_data
@pytest.mark.slow
def test_rehearsals_run_end_to_end_and_audit_clean(rehearsed):
    repo, seconds, jobs = rehearsed
    assert jobs == {"target": 1, "prepare": 2, "regenerate": 1, "tokenize": 2, "train": 3, "convert": 3, "baseline": 1,
                    "bench": 3, "report": 2, "paper": 1, "phase_e": 1}
    for phase in ("paper", "phase_e"):
        proc = dflash(repo, "audit", f"rehearsal/{phase}", data=SHARED_DATA)
        assert proc.returncode == 0 and proc.stdout.splitlines()[0].endswith(": OK"), proc.stdout + proc.stderr
        rep = repo / "results" / "reports" / "rehearsal" / phase
        text = (rep / "report.md").read_text()
        assert text.startswith(f"# REHEARSAL of phase `{phase}`") and "Datasets left out: math500, aime24" in text
        tau = {r["dataset"]: float(r["tau"]) for r in csv.DictReader(open(rep / "tables" / "tau.csv"))
               if r["source"].startswith("bench/")}
        assert sorted(tau) == sorted(CI_DATASETS) and all(t >= 1.0 for t in tau.values())
    assert seconds < 900                      # loose guard (measured: see the README's rehearsal section)


@needs_data
@pytest.mark.slow
def test_rehearsed_drafter_has_the_qwen3_mask_id_and_the_layer_ids_of_its_target(rehearsed):
    repo = rehearsed[0]
    links = repo / "results" / "phases" / "rehearsal" / "paper" / "main"
    cfg = json.loads((links / "convert" / "config.json").read_text())
    assert cfg["dflash_config"] == {"mask_token_id": 151669, "target_layer_ids": build_target_layer_ids(DEPTH, 5)}
    assert cfg["vocab_size"] == 151936 and cfg["num_target_layers"] == DEPTH
    train = json.loads((links / "train" / "provenance.json").read_text())
    assert train["config"]["rehearsal"]["drafter.target_layer_ids"] == [[1, 9, 17, 25, 33], None]
    assert train["summary"]["optimizer"]["betas"] == [0.9, 0.999]
    assert train["summary"]["loss_normalisation"]["mode"] == "global_weight_sum"
    assert train["summary"]["empty_micro_batches"] == 0 and train["version"] == 3
    regen = json.loads((links / "regenerate" / "provenance.json").read_text())
    assert regen["config"]["regenerate"]["engine"] == "sglang" == regen["summary"]["engine_requested"]
    assert regen["summary"]["engine"] == "hf" and "sglang" in regen["summary"]["fallback"]      # recorded, on CPU


@needs_data
@pytest.mark.slow
def test_rehearsal_outputs_never_stand_for_real_ones(rehearsed):
    repo = rehearsed[0]
    real = job_counts((p := snakemake(repo, "-n", "paper", "phase_e")).stdout + p.stderr)
    reg = load_registry(only=["paper", "phase_e"])
    benches = {k for plans in reg.plans.values() for plan in plans.values() for k in plan.bench.values()}
    assert len(benches) == 40                                     # 3 runs x 10 sets + paper's zlab run
    assert real["target"] == 1 and real["report"] == 2                                 # nothing real done
    assert real["bench"] == 4 and real["baseline"] == 1        # one job per run's engine, one baseline job
    assert "nothing unreferenced" in dflash(repo, "gc").stdout                         # gc keeps the rehearsals
    assert load_phase("paper").runs["main"]["target"]["kind"] == "hub"


def test_an_overlay_dataset_list_keeps_those_sets_and_records_the_rest(tmp_path):
    doc = yaml.safe_load(REHEARSAL_FILE.read_text())
    doc["datasets"] = ["mt_bench", "gsm8k"]
    (tmp_path / "rehearsal.yaml").write_text(yaml.safe_dump(doc))
    reh = rehearsal.load("rehearsal/phase_e", overlay_path=tmp_path / "rehearsal.yaml")
    assert [d["name"] for d in reh.datasets] == ["gsm8k", "mt_bench"]                 # the phase's order
    assert len(reh.rehearsal["datasets_left_out"]) == 8 and "livecodebench" in reh.rehearsal["datasets_left_out"]
    smoke = rehearsal.load("rehearsal/smoke", overlay_path=tmp_path / "rehearsal.yaml")
    assert len(smoke.datasets) == 3 and smoke.rehearsal["datasets_left_out"] == []   # none of them: keeps its own
