"""The seed PR's phases A..K and the paper's recipe as phase configs: recipes, sharing, planning speed."""

import copy
import resource
import time

import pytest

from conftest import job_counts, snakemake
from dflash import cli
from dflash.data.benchmarks import DATASETS
from dflash.modeling.schedule import total_steps
from dflash.plan.config import load_phase, phase_names
from dflash.plan.keys import build
from dflash.results import report

PR_PHASES = [f"phase_{c}" for c in "abcdefghijk"]
PERFECTBLEND = "mlabonne/open-perfectblend"

# (phase, run): perfectblend subsample n (None = not PerfectBlend / whole), seq, epochs or max_steps, lr, min_lr,
# weight decay, schedule, anchors, planned global batch, (gpus, inference gpus) of the training job
RECIPES = {
    ("phase_a", "main"): (64, 4096, {"max_steps": 200}, 1e-4, 0.0, 0.0, "cosine", 512, 1, (1, 0)),
    ("phase_b", "main"): (64, 4096, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 512, 2, (4, 2)),
    ("phase_c", "main"): (50_000, 2048, {"epochs": 4}, 6e-4, 0.0, 0.0, "cosine", 256, 8, (4, 2)),
    ("phase_d", "D-smoke"): (50_000, 4096, {"max_steps": 30}, 1e-4, 0.0, 0.0, "cosine", 512, 1, (1, 0)),
    ("phase_d", "P3-2ep"): (50_000, 2048, {"epochs": 2}, 6e-4, 0.0, 0.0, "cosine", 512, 12, (4, 1)),
    ("phase_d", "P3-3ep"): (50_000, 2048, {"epochs": 3}, 6e-4, 0.0, 0.0, "cosine", 512, 12, (4, 1)),
    ("phase_e", "S1"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 512, 8, (3, 1)),
    ("phase_e", "T2"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 512, 8, (3, 1)),
    ("phase_f", "A"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 256, 28, (8, 1)),
    ("phase_f", "B"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 256, 28, (8, 1)),
    ("phase_f", "C2"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 256, 24, (8, 2)),
    ("phase_f", "512-C"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 512, 24, (8, 2)),
    ("phase_f", "512-D"): (50_000, 2048, {"max_steps": 200}, 6e-4, 0.0, 0.0, "cosine", 512, 24, (8, 2)),
    ("phase_g", "main"): (200_000, 2048, {"epochs": 3}, 6e-4, 0.0, 0.0, "cosine", 512, 24, (8, 2)),
    ("phase_h", "main"): (800_000, 2048, {"epochs": 3}, 6e-4, 6e-5, 0.01, "cosine", 512, 12, (8, 2)),
    ("phase_i", "main"): (800_000, 2048, {"epochs": 3}, 6e-4, 6e-5, 0.01, "cosine", 512, 12, (8, 2)),
    ("phase_j", "main"): (None, 2048, {"epochs": 3}, 6e-4, 6e-5, 0.01, "cosine", 512, 12, (8, 2)),
    ("phase_k", "R00"): (200_000, 2048, {"max_steps": 1000}, 6e-4, 6e-5, 0.01, "cosine", 512, 12, (8, 2)),
    ("phase_k", "R07"): (200_000, 2048, {"max_steps": 1000}, 6e-4, 6e-5, 0.01, "cosine", 512, 6, (8, 2)),
    ("phase_k", "P2-baseline"): (800_000, 2048, {"epochs": 3}, 6e-4, 6e-5, 0.01, "cosine", 512, 12, (8, 2)),
    ("phase_k", "P2-WSD"): (800_000, 2048, {"epochs": 3}, 6e-4, 6e-5, 0.01, "wsd", 512, 12, (8, 2)),
    ("phase_k", "P2-accum1"): (800_000, 2048, {"epochs": 3}, 6e-4, 6e-5, 0.01, "cosine", 512, 6, (8, 2)),
}


@pytest.fixture(scope="module")
def phases():
    return {name: load_phase(name) for name in phase_names()}


def test_every_phase_plans(phases, capsys):
    assert set(PR_PHASES) | {"paper", "qwen3_8b", "smoke"} <= set(phases)
    for name in phases:
        assert cli.main(["plan", name]) == 0, name
        assert f"phase {name}" in capsys.readouterr().out


@pytest.mark.parametrize("phase, run", list(RECIPES))
def test_seed_pr_recipe(phases, phase, run):
    n, seq, length, lr, min_lr, wd, schedule, anchors, gb, (gpus, inf) = RECIPES[(phase, run)]
    cfg = phases[phase].runs[run]
    assert cfg["target"] == {**cfg["target"], "kind": "hub", "hub_id": "Qwen/Qwen3-8B"}
    assert cfg["regenerate"]["enabled"] is False                  # the seed PR trained on the original responses
    [src] = cfg["data"]["sources"]
    assert src["kind"] == "hub"
    if n is None:
        assert src["hub_id"] != PERFECTBLEND
    else:
        assert src["hub_id"] == PERFECTBLEND and src["n"] == n and src["format"] == "sharegpt"
    tc = cfg["train"]
    assert cfg["tokenize"]["max_length"] == seq
    for k, v in length.items():
        assert tc[k] == v
    if "epochs" in length:
        assert tc["max_steps"] is None
    assert (tc["lr"], tc["min_lr"], tc["weight_decay"], tc["schedule"], tc["num_anchors"]) == \
        (lr, min_lr, wd, schedule, anchors)
    res = cfg["resources"]["train"]
    assert (res["gpus"], res["inference_gpus"]) == (gpus, inf)
    assert report.planned_global_batch(cfg) == gb
    assert cfg["drafter"]["block_size"] == 16 and cfg["drafter"]["num_layers"] == (1 if phase in ("phase_a", "phase_b")
                                                                                   else 5)


def test_phase_k_sweep(phases):
    k = phases["phase_k"]
    assert list(k.runs) == [f"R{i:02d}" for i in range(12)] + ["P2-baseline", "P2-WSD", "P2-accum1"]
    base = k.runs["R00"]["train"]
    changed = {run: {f: v for f, v in cfg["train"].items() if base[f] != v}
               for run, cfg in k.runs.items() if run.startswith("R")}
    assert changed == {
        "R00": {}, "R01": {"lr": 1e-3, "min_lr": 1e-4}, "R02": {"lr": 3e-4, "min_lr": 3e-5},
        "R03": {"schedule": "wsd"}, "R04": {"schedule": "constant", "min_lr": 6e-4}, "R05": {"weight_decay": 0.1},
        "R06": {"weight_decay": 0.0}, "R07": {"grad_accum": 1}, "R08": {"warmup_ratio": 0.1}, "R09": {"gamma": 3.0},
        "R10": {"gamma": 14.0}, "R11": {"lr": 1e-3, "schedule": "wsd", "grad_accum": 1, "warmup_ratio": 0.02}}
    assert (base["decay_ratio"], base["decay_style"], base["gamma"], base["grad_accum"]) == (0.2, "cosine", 7.0, 2)
    for run, cfg in k.runs.items():
        if run.startswith("R"):
            # the 1,000-step runs state it, and their schedule is exactly those 1,000 steps, whatever the data size
            assert cfg["train"]["max_steps"] == 1000
            assert total_steps(188_977, cfg["train"])[0] == total_steps(10, cfg["train"])[0] == 1000
        else:
            assert cfg["train"]["max_steps"] is None and cfg["train"]["epochs"] == 3


def test_benchmarks_are_the_ten_zlab_sets_at_default_counts(phases):
    for name in [*PR_PHASES, "paper", "qwen3_8b"]:
        ph = phases[name]
        assert [d["name"] for d in ph.datasets] == list(DATASETS), name
        assert all(d["n"] == DATASETS[d["name"]].default_n for d in ph.datasets), name
        for cfg in ph.runs.values():
            b = cfg["bench"]
            assert (b["max_new_tokens"], b["temperature"], b["enable_thinking"]) == (2048, 0.0, False)
        assert {"zlab_readme", "dflash_paper_table1", "dflash_paper_table10_no_target_features"} <= set(ph.references)


def test_external_published_runs(phases):
    ext = {name: {k: (v["source"], v["method"]) for k, v in phases[name].external.items()} for name in PR_PHASES}
    assert ext["phase_g"] == {"pr51-G": ("torchspec_pr51", "phase_g")}
    assert ext["phase_h"] == {"pr51-H": ("torchspec_pr51", "phase_h")}
    assert ext["phase_j"] == {"pr51-J": ("torchspec_pr51", "phase_j_ultrachat")}
    assert set(ext["phase_k"]) == {"pr51-P2-accum1", "pr51-P2-WSD"}


def test_paper_recipe(phases):
    cfg = phases["paper"].runs["main"]
    assert cfg["regenerate"]["enabled"] is True
    assert cfg["tokenize"]["max_length"] == 3072
    tc = cfg["train"]
    assert (tc["epochs"], tc["schedule"], tc["num_anchors"], tc["lr"], tc["warmup_ratio"], tc["max_steps"]) == \
        (6, "cosine", 512, 6e-4, 0.04, None)
    assert {s["hub_id"] for s in cfg["data"]["sources"]} == {"nvidia/Nemotron-Post-Training-Dataset-v2",
                                                            "sahil2801/CodeAlpaca-20k"}
    assert cfg["bench"]["engine"] == "fast"             # z-lab's loop and timing without the eager launch overhead
    assert phases["paper"].runs["zlab"]["drafter"]["pretrained"] == "z-lab/Qwen3-8B-DFlash-b16"


def test_shared_stages_across_phases(phases):
    reg = build(phases)
    plans = reg.plans
    h, i, k = plans["phase_h"]["main"], plans["phase_i"]["main"], plans["phase_k"]
    assert {**h.keys, **h.bench} == {**i.keys, **i.bench}          # phase I re-benchmarks phase H: nothing reruns
    assert k["P2-baseline"].keys == h.keys                          # the PR's P2-baseline is phase H's recipe
    assert k["R00"].keys["tokenize"] == plans["phase_g"]["main"].keys["tokenize"]     # 200K data, shared
    assert len({p.keys["target"] for name in [*PR_PHASES, "paper", "qwen3_8b"] for p in plans[name].values()}) == 1
    assert len({p.keys["tokenize"] for p in k.values()}) == 2
    assert len({p.keys["train"] for p in k.values()}) == 15


def _all_keys(plans):
    out = {}
    for run, p in plans.items():
        out.update({(run, stage): key for stage, key in p.keys.items()})
        out.update({(run, f"bench/{d}"): key for d, key in p.bench.items()})
    return out


def test_one_run_change_replans_only_its_subtree(phases):
    base = phases["phase_k"]
    changed = copy.deepcopy(base)
    changed.runs["R03"]["train"]["lr"] = 5.0e-4
    before = _all_keys(build({"phase_k": base}).plans["phase_k"])
    after = _all_keys(build({"phase_k": changed}).plans["phase_k"])
    diff = sorted(k for k in before if before[k] != after[k])
    assert diff == sorted([("R03", "train"), ("R03", "convert"), *(("R03", f"bench/{d}") for d in DATASETS)])
    # and a data change in one phase-2 run replans that run's data stages and below, not phase 1's
    changed = copy.deepcopy(base)
    changed.runs["P2-WSD"]["tokenize"]["max_length"] = 3072
    after = _all_keys(build({"phase_k": changed}).plans["phase_k"])
    assert {k[0] for k in before if before[k] != after[k]} == {"P2-WSD"}
    assert ("P2-WSD", "prepare") not in {k for k in before if before[k] != after[k]}


def test_snakemake_plans_phase_k(repo):
    """The Snakefile loads every phase at parse time and plans the 15-run sweep with shared data stages. The speed
    goal (< 3 s of CPU) is measured by benchmarks/plan_speed.py; here only a loose guard (about 3x the measured
    CPU time of the snakemake process, user + sys, which a loaded machine inflates far less than wall time)."""
    snakemake(repo, "-n", "phase_k")                 # warm the file system and Python caches
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = snakemake(repo, "-n", "phase_k")
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["target"] == 1 and counts["prepare"] == 2 and counts["tokenize"] == 2   # shared data stages
    assert counts["train"] == 15 and counts["convert"] == 15
    assert counts["bench"] == 15 and counts["baseline"] == 1          # 150 benches on 15 engines, 10 baselines
    assert cpu < 10.0, f"snakemake -n phase_k took {cpu:.2f} s of CPU ({wall:.2f} s wall)"
