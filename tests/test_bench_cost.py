"""The bench stage at the cost of the work: one baseline per target, dataset and decoding settings, shared by runs;
one engine (model or SGLang server) per job, for all the datasets of a run. On CPU, with the fake SGLang server of
test_sglang_engine and drafters given as published directories (no training)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from test_sglang_engine import build_tiny_target, fake_server_command, write_fake_server

from conftest import ROOT, copy_repo, snakemake
from dflash.decoding import metrics
from dflash.decoding import sglang as sglang_engine
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.plan.paths import ResultsTree
from dflash.results import audit
from dflash.stages import runner

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_cost  # noqa: E402

SETS = [{"name": "synthetic_math", "n": 2}, {"name": "synthetic_code", "n": 2}, {"name": "synthetic_chat", "n": 2}]


def _sglang_phase(tmp: Path) -> tuple[Path, Path]:
    """A phase of 3 runs (three published drafter directories) x 3 sets on the SGLang engine."""
    model = build_tiny_target(tmp / "tgt") / "model"
    runs = {}
    for i in range(3):
        d = tmp / f"drafter{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"block_size": 4 + i, "dflash_config": {"target_layer_ids": [0]}}))
        (d / "model.safetensors").write_bytes(bytes([i]) * 16)
        runs[f"r{i}"] = {"drafter": {"pretrained": str(d)}}
    phases = tmp / "phases"
    phases.mkdir()
    (phases / "three.yaml").write_text(json.dumps({
        "description": "3 runs x 3 sets through SGLang",
        "defaults": {"target": {"kind": "path", "path": str(model)},
                     "bench": {"engine": "sglang", "dtype": "bfloat16", "device": "cuda", "max_new_tokens": 16},
                     "resources": {"bench": {"gpus": 1, "cpus_per_gpu": 1}}},
        "runs": runs, "datasets": SETS}))
    return phases, model


def test_three_runs_by_three_sets_start_three_dflash_servers_and_one_target_only(tmp_path, monkeypatch):
    """Bench 1 started 2 servers per (run, set): 18 here. Now: one DFLASH server per run, one target-only server
    for the baseline group the runs share; every dataset keeps its own directory, records and timings; the report
    and the audit read the shared baselines."""
    phases, _ = _sglang_phase(tmp_path)
    fake = write_fake_server(tmp_path)
    started = []

    def command(spec):
        started.append("dflash" if spec.draft_model_path else "target-only")
        return fake_server_command(fake)(spec)

    monkeypatch.setattr(sglang_engine, "require_sglang", lambda need_gpu=True: None)
    monkeypatch.setattr(sglang_engine, "server_command", command)
    results = ResultsTree(tmp_path / "results")
    reg = build({"three": load_phase("three", phases)}, results)
    plans = reg.plans["three"]
    assert len({k for p in plans.values() for k in p.baseline.values()}) == 3          # shared by the 3 runs
    assert len({k for p in plans.values() for k in p.bench.values()}) == 9
    assert [len(g) for g in reg.engine_groups("baseline").values()] == [3]
    assert sorted(len(g) for g in reg.engine_groups("bench").values()) == [3, 3, 3]
    runner.run(reg, "target", plans["r0"].keys["target"])
    for stage in ("baseline", "bench"):
        for engine, keys in reg.engine_groups(stage).items():
            runner.run_many(reg, stage, keys, engine)
    assert sorted(started) == ["dflash"] * 3 + ["target-only"]

    for run, plan in plans.items():
        firsts = []
        for ds, key in plan.bench.items():
            prov = json.loads((results.stage_dir("bench", key) / "provenance.json").read_text())
            s = prov["summary"]
            assert prov["upstream"]["baseline"] == plan.baseline[ds] == s["baseline"]["key"]
            assert s["lossless"] is True and s["engine"]["kind"] == "sglang-dflash"
            assert s["engine"]["startup_s"] > 0 and s["engine"]["log"].endswith("sglang-dflash.log")
            assert s["tau_tokens_per_step"] > 0 and s["tau_new_per_step"] < s["tau_tokens_per_step"]
            firsts.append(s["engine"]["started_here"])
            records = [json.loads(x) for x in (results.stage_dir("bench", key) / "records.jsonl").open()]
            assert all(r["verify_steps"] >= 1 and r["baseline"]["same_prompt"] for r in records)
            assert "$ " in (results.stage_dir("bench", key) / "sglang-dflash.log").read_text()
        assert firsts == [True, False, False], run                  # the first dataset of the job started it
    cost = bench_cost.phase_cost("three", results, phases)
    assert cost["engine_starts"] == 4 and cost["bench1_layout_starts"] == 18
    assert cost["stages"]["baseline"] == {**cost["stages"]["baseline"], "instances": 3, "engine_starts": 1}
    assert cost["stages"]["bench"]["engine_starts"] == 3 and cost["stages"]["bench"]["instances"] == 9

    # a rerun after a kill: complete datasets are kept, nothing starts
    started.clear()
    for engine, keys in reg.engine_groups("bench").items():
        runner.run_many(reg, "bench", keys, engine)
    assert started == []
    runner.run(reg, "report", reg.report_key("three"))
    tau = (results.report_dir("three") / "tables" / "tau.csv").read_text().splitlines()
    assert tau[0].split(",")[6:8] == ["tau_tokens_per_step", "tau_new_per_step"]
    speed = (results.report_dir("three") / "tables" / "speedup.csv").read_text()
    assert speed.splitlines()[0].endswith(",baseline_hardware,temperature,source,baseline")
    result = audit.audit(reg, "three")
    assert result.ok, result.summary()
    assert result.dirs == 1 + 1 + 3 + 9                    # report, target, baselines, benches

    # a bench record whose baseline copy differs from the baseline stage is found (with its checksum fixed)
    key = plans["r1"].bench["synthetic_code"]
    d = results.stage_dir("bench", key)
    lines = (d / "records.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["baseline"]["decode_s"] *= 0.5
    (d / "records.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    prov = json.loads((d / "provenance.json").read_text())
    from dflash.checksums import sha256_file
    prov["outputs"]["records.jsonl"] = sha256_file(d / "records.jsonl")
    (d / "provenance.json").write_text(json.dumps(prov))
    text = audit.audit(reg, "three").summary()
    assert "baseline decode_s differ from" in text, text


def test_smollm2_shaped_plans_share_ten_baselines_in_one_job_per_engine():
    """smollm2_fast, 3 runs x 10 sets: 10 baseline instances (not 30), one baseline job and 3 bench jobs (one per
    run's engine); the published smollm2 tree (bench 1, baseline inside) keeps its keys."""
    reg = build({"smollm2_fast": load_phase("smollm2_fast", ROOT / "configs" / "phases")})
    plans = reg.plans["smollm2_fast"]
    baselines = {k for p in plans.values() for k in p.baseline.values()}
    benches = {k for p in plans.values() for k in p.bench.values()}
    assert (len(plans), len(baselines), len(benches)) == (3, 10, 30)
    assert [len(g) for g in reg.engine_groups("baseline").values()] == [10]
    assert sorted(len(g) for g in reg.engine_groups("bench").values()) == [10, 10, 10]
    old = build({"smollm2": load_phase("smollm2", ROOT / "configs" / "phases")}, versions={"bench": 1, "train": 1})
    assert not any(p.baseline for p in old.plans["smollm2"].values())
    published = json.loads((ROOT / "docs/results/smollm2/reports/smollm2/provenance.json").read_text())
    assert {r: p.bench for r, p in old.plans["smollm2"].items()} == \
        {r: k["bench"] for r, k in published["upstream"]["runs"].items()}


@pytest.mark.skipif(os.environ.get("DFLASH_SKIP_SNAKEMAKE") == "1", reason="no snakemake run wanted")
def test_snakemake_dry_run_of_smollm2_fast_writes_10_baselines_and_30_benches(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    out = snakemake(repo, "-n", "smollm2_fast")
    text = out.stdout + out.stderr
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert sum(v for k, v in counts.items() if k.startswith("baseline_")) == 1, text
    assert sum(v for k, v in counts.items() if k.startswith("bench_")) == 3, text
    summary = snakemake(repo, "--summary", "smollm2_fast").stdout
    outputs = [line.split("\t")[0] for line in summary.splitlines()[1:]]
    assert sum(o.startswith("results/baseline/") for o in outputs) == 10
    assert sum(o.startswith("results/bench/") for o in outputs) == 30


KILLED_JOB = r'''
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from dflash.decoding import sglang as sglang_engine
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.plan.paths import ResultsTree
from dflash.stages import bench, runner
from test_sglang_engine import fake_server_command

phases, results, fake = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sglang_engine.require_sglang = lambda need_gpu=True: None
sglang_engine.server_command = fake_server_command(fake)
serve = bench.serve_conversations


def slow(*args, **kwargs):          # every dataset takes a while, so the kill lands inside the second
    out = serve(*args, **kwargs)
    time.sleep(2)
    return out


bench.serve_conversations = slow
reg = build({"three": load_phase("three", phases)}, ResultsTree(results))
engine, keys = next(iter(reg.engine_groups("bench").items()))
runner.run_many(reg, "bench", keys, engine)
'''


def test_a_killed_bench_job_leaves_no_server_and_resumes(tmp_path, monkeypatch):
    """kill -9 of the job process between its datasets: the kernel stops its server (parent-death signal); the
    rerun keeps the finished dataset and starts one server for the rest."""
    import signal
    import subprocess
    import time

    from dflash.processes import pid_alive

    phases, _ = _sglang_phase(tmp_path)
    fake = write_fake_server(tmp_path)
    results = ResultsTree(tmp_path / "results")
    reg = build({"three": load_phase("three", phases)}, results)
    runner.run(reg, "target", reg.plans["three"]["r0"].keys["target"])
    for engine, keys in reg.engine_groups("baseline").items():
        monkeypatch.setattr(sglang_engine, "require_sglang", lambda need_gpu=True: None)
        monkeypatch.setattr(sglang_engine, "server_command", fake_server_command(fake))
        runner.run_many(reg, "baseline", keys, engine)
    engine, keys = next(iter(reg.engine_groups("bench").items()))
    script, err = tmp_path / "job.py", tmp_path / "job.err"
    script.write_text(KILLED_JOB)
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, str(script), str(phases), str(results.root), str(fake),
                                 str(ROOT / "tests")], stdout=subprocess.DEVNULL, stderr=f)
    first = results.stage_dir("bench", keys[0]) / "provenance.json"
    deadline = time.monotonic() + 120
    while not first.is_file():
        assert proc.poll() is None, err.read_text()[-2000:]
        assert time.monotonic() < deadline, "no dataset finished within 120 s"
        time.sleep(0.05)
    server = int(re.search(r"sglang: started pid (\d+)", err.read_text()).group(1))
    assert pid_alive(server)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while pid_alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(server), "the server outlived its killed job"
    assert not (results.stage_dir("bench", keys[1]) / "provenance.json").is_file()
    kept = first.read_text()
    started = []

    def command(spec):
        started.append(spec)
        return fake_server_command(fake)(spec)

    monkeypatch.setattr(sglang_engine, "server_command", command)
    runner.run_many(reg, "bench", keys, engine)
    assert len(started) == 1 and first.read_text() == kept
    assert all((results.stage_dir("bench", k) / "provenance.json").is_file() for k in keys)
    second = json.loads((results.stage_dir("bench", keys[1]) / "summary.json").read_text())
    assert second["engine"]["started_here"] is True               # the rerun's first dataset started it


def test_local_engine_loads_once_per_job_and_stays_lossless(tmp_path, monkeypatch):
    """The HF engine, 1 run x 3 sets at float32: one job loads target and drafter once (the baseline job the target
    once), every set keeps its directory, records and timings, and DFlash commits the baseline's tokens."""
    from transformers import Qwen3ForCausalLM

    from dflash.modeling.drafter import DFlashDrafter, DrafterConfig
    from dflash.stages import bench

    model = build_tiny_target(tmp_path / "tgt") / "model"
    target = Qwen3ForCausalLM.from_pretrained(model)
    cfg = DrafterConfig.for_target(target.config, {"num_layers": 1, "num_target_layers": None,
                                                   "target_layer_ids": [0], "block_size": 4,   # 2 layers: not L-1
                                                   "intermediate_size": None}, mask_token_id=5)
    drafter = DFlashDrafter(cfg)
    drafter.init_weights(0)
    drafter.save(tmp_path / "drafter", "float32")
    phases = tmp_path / "phases"
    phases.mkdir()
    (phases / "local.yaml").write_text(json.dumps({
        "defaults": {"target": {"kind": "path", "path": str(model)},
                     "drafter": {"pretrained": str(tmp_path / "drafter")},
                     "bench": {"engine": "hf", "device": "cpu", "dtype": "float32", "max_new_tokens": 12}},
        "runs": {"main": {}}, "datasets": SETS}))
    results = ResultsTree(tmp_path / "results")
    reg = build({"local": load_phase("local", phases)}, results)
    plan = reg.plans["local"]["main"]
    runner.run(reg, "target", plan.keys["target"])
    loads = []
    real_load = bench.load_target

    def counted(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(bench, "load_target", counted)
    for stage in ("baseline", "bench"):
        ((engine, keys),) = reg.engine_groups(stage).items()
        assert len(keys) == 3
        runner.run_many(reg, stage, keys, engine)
    assert len(loads) == 2                                        # one per job: baseline, bench
    firsts = []
    for ds, key in plan.bench.items():
        s = json.loads((results.stage_dir("bench", key) / "summary.json").read_text())
        assert s["lossless"] is True and s["diverged"] == 0 and s["baseline"]["key"] == plan.baseline[ds]
        assert s["engine"]["kind"] == "hf" and s["engine"]["load_s"] > 0
        assert s["tau_new_per_step"] <= s["tau_macro"] + 1e-9
        firsts.append((s["engine"]["started_here"], s["warmup_s"] > 0))
        records = [json.loads(x) for x in (results.stage_dir("bench", key) / "records.jsonl").open()]
        assert all(r["verify_steps"] == metrics.output_steps(r["accept_lengths"], r["n_tokens"])
                   and r["verify_steps"] <= len(r["accept_lengths"]) and "prompt_ids" not in r for r in records)
    assert firsts == [(True, True), (False, False), (False, False)]
    cost = bench_cost.phase_cost("local", results, phases)
    assert cost["engine_starts"] == 2 and cost["bench1_layout_starts"] == 3


FAKE_DFLASH = """#!/usr/bin/env bash
# stands in for `dflash stage <stage> KEY... --engine E`: records its arguments, writes each key's provenance.json
echo "$@" >> "$CALLS"
stage=$2; shift 2
while [ $# -gt 0 ] && [ "$1" != "--engine" ]; do
  mkdir -p "results/$stage/$1" && echo '{}' > "results/$stage/$1/provenance.json"; shift
done
"""


def test_an_engine_job_runs_with_its_own_keys(tmp_path):
    """The command an engine job runs names exactly the keys its rule outputs (rules made in a loop: a shell string
    formatted when the job runs once read the last loop iteration's keys)."""
    repo = copy_repo(tmp_path / "repo")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dflash").write_text(FAKE_DFLASH)
    (bin_dir / "dflash").chmod(0o755)
    reg = build({"smollm2_fast": load_phase("smollm2_fast", ROOT / "configs" / "phases")})
    plan = reg.plans["smollm2_fast"]["regenerated"]
    target = repo / "results" / "target" / plan.keys["target"]
    target.mkdir(parents=True)
    (target / "provenance.json").write_text("{}")
    os.utime(target / "provenance.json", (1e9, 1e9))
    wanted = [f"results/baseline/{k}/provenance.json" for k in plan.baseline.values()]
    calls = tmp_path / "calls"
    e = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls)}
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *wanted], cwd=repo, env=e,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (call,) = calls.read_text().splitlines()
    args = call.split()
    assert args[:2] == ["stage", "baseline"] and sorted(args[2:-2]) == sorted(plan.baseline.values())
