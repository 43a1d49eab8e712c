"""The smoke phase end to end through Snakemake, then the planning guarantees on the finished run."""

import csv
import json
import resource

import yaml

from conftest import dflash, job_counts, snakemake


def planned_jobs(repo, target="smoke") -> dict[str, int]:
    proc = snakemake(repo, "-n", target)
    return job_counts(proc.stdout + proc.stderr)


def test_smoke_outputs_and_signal(smoke_repo):
    rep = smoke_repo / "results" / "reports" / "smoke"
    for f in ["report.md", "tables/tau.csv", "tables/speedup.csv", "tables/training.csv", "figures/loss.png",
              "figures/tau.png", "figures/acceptance.png", "provenance.json"]:
        assert (rep / f).is_file(), f
    rows = list(csv.DictReader(open(rep / "tables" / "tau.csv")))
    per = {r["dataset"]: float(r["tau"]) for r in rows}
    assert {"synthetic_math", "synthetic_code", "synthetic_chat", "overall"} <= set(per)
    mean = sum(per[d] for d in ("synthetic_math", "synthetic_code", "synthetic_chat")) / 3
    assert abs(per["overall"] - mean) < 1e-3
    assert per["overall"] >= 2.0                                   # the drafter learned the target
    # one dataset per family: no family mean that repeats it; no references: said once, no empty tables
    assert not [d for d in per if d.endswith(" avg")]
    md = (rep / "report.md").read_text()
    assert md.count("No references") == 1 and "this phase names none" in md
    assert "## Deltas" not in md and "against references" not in md and " avg |" not in md
    speed = list(csv.DictReader(open(rep / "tables" / "speedup.csv")))
    assert all(r["lossless"] == "True" for r in speed)
    assert (smoke_repo / "results" / "phases" / "smoke" / "main" / "train").resolve().is_dir()


def test_every_stage_has_provenance_and_chain(smoke_repo):
    for d in (smoke_repo / "results").glob("*/*"):
        if d.parent.name in ("logs", "phases", "checkpoints", "reports", ".locks") or d.name.startswith("."):
            continue
        prov = json.loads((d / "provenance.json").read_text())
        assert prov["key"] == d.name and prov["stage"] == d.parent.name
        assert prov["git"]["commit"] and prov["packages"]["torch"] and prov["outputs"]
        for rel, digest in prov["outputs"].items():
            assert len(digest) == 64 and (d / rel).is_file()
    proc = dflash(smoke_repo, "provenance", "results/reports/smoke/tables/tau.csv")
    assert proc.returncode == 0
    for stage in ("report", "bench", "convert", "train", "tokenize", "regenerate", "prepare", "target"):
        assert f"{stage} " in proc.stdout


def test_rerun_plans_nothing_quickly(smoke_repo):
    """A finished phase plans nothing, in little CPU time (wall time also waits on whatever the installed executor
    plugins probe, e.g. a Slurm controller, so it is not what is bounded here)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = snakemake(smoke_repo, "-n", "smoke")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) < 10.0     # loose guard: ~3-4 s
    assert "Nothing to be done" in proc.stdout + proc.stderr
    plan = json.loads(dflash(smoke_repo, "plan", "smoke", "--json").stdout)
    assert all(r["exists"] for r in plan)


def _edit(repo, section, key, value):
    path = repo / "configs" / "phases" / "smoke.yaml"
    original = path.read_text()
    doc = yaml.safe_load(original)
    doc["defaults"].setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(doc))
    return path, original


def test_train_change_plans_train_subtree_only(smoke_repo):
    path, original = _edit(smoke_repo, "train", "gamma", 5.0)
    try:
        assert planned_jobs(smoke_repo) == {"train": 1, "convert": 1, "bench": 1, "report": 1, "smoke": 1}
    finally:
        path.write_text(original)


def test_bench_change_plans_bench_and_report_only(smoke_repo):
    path, original = _edit(smoke_repo, "bench", "max_new_tokens", 48)
    try:
        assert planned_jobs(smoke_repo) == {"baseline": 1, "bench": 1, "report": 1, "smoke": 1}
    finally:
        path.write_text(original)
