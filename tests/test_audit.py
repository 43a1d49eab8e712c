"""`dflash audit` after the real smoke run (on a copy of it), and `dflash gc`."""

import csv
import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import dflash, snakemake


@pytest.fixture
def audited(smoke_repo, tmp_path):
    """A copy of the finished smoke repository, free to damage."""
    dest = tmp_path / "repo"
    shutil.copytree(smoke_repo, dest, symlinks=True)
    return dest


def _bench_dir(repo, dataset="synthetic_math"):
    link = repo / "results" / "phases" / "smoke" / "main" / "bench" / dataset
    return link.resolve().relative_to(repo.resolve())


def test_audit_passes_after_the_smoke_run(smoke_repo):
    proc = dflash(smoke_repo, "audit", "smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = proc.stdout.splitlines()[0]
    assert head.endswith(": OK")
    dirs, files, cells = map(int, re.findall(r"(\d+) directories, (\d+) files, (\d+) table cells", head)[0])
    assert dirs >= 10 and files >= 20 and cells >= 50     # report, 7 stages of the run + 3 benches; every cell


def test_snakemake_html_report_has_captions_and_categories(smoke_repo, tmp_path):
    out = tmp_path / "report.zip"
    snakemake(smoke_repo, "smoke", "--report", str(out))
    with zipfile.ZipFile(out) as z:
        html = z.read(next(n for n in z.namelist() if n.endswith("report.html"))).decode()
    for name in ("tau.csv", "deltas.csv", "references.csv", "training.csv", "tau_references.png", "loss.png"):
        assert name in html, name
    for text in ("Tables", "Figures", "References", "WITHOUT target features"):     # categories and captions
        assert text in html, text


def test_a_changed_byte_in_a_bench_record_fails_and_names_the_file(audited):
    rel = _bench_dir(audited) / "records.jsonl"
    path = audited / rel
    data = bytearray(path.read_bytes())
    i = data.index(b'"accept_lengths": [') + len(b'"accept_lengths": [')
    assert chr(data[i]).isdigit()
    data[i] = ord("1") if data[i] != ord("1") else ord("2")        # one byte; still a valid record
    path.write_bytes(bytes(data))
    proc = dflash(audited, "audit", "smoke")
    assert proc.returncode == 1
    out = proc.stdout
    assert f"{rel}: sha256" in out and "changed after the stage wrote it" in out
    assert "tau.csv[main/synthetic_math]" in out                      # the cells that depend on it
    assert re.search(r"tau\.csv: tau\.csv\[main/synthetic_math\] tau: table has '[\d.]+', the raw records give", out)
    assert "summary.json" in out                                      # the bench summary no longer matches its records


def test_an_edited_table_cell_fails(audited):
    path = audited / "results" / "reports" / "smoke" / "tables" / "tau.csv"
    rows = list(csv.DictReader(open(path)))
    cols = list(rows[0])
    for r in rows:
        if r["dataset"] == "overall":
            r["tau"] = f"{float(r['tau']) + 0.5:.4f}"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    proc = dflash(audited, "audit", "smoke")
    assert proc.returncode == 1
    assert "results/reports/smoke/tables/tau.csv: sha256" in proc.stdout
    assert "main/overall: tau" in proc.stdout and "is not the mean of the run's 3 per-dataset rows" in proc.stdout


def test_an_edited_provenance_config_fails(audited):
    train = (audited / "results" / "phases" / "smoke" / "main" / "train").resolve()
    prov_path = train / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["config"]["train"]["lr"] = prov["config"]["train"]["lr"] * 2
    prov_path.write_text(json.dumps(prov))
    proc = dflash(audited, "audit", "smoke")
    assert proc.returncode == 1
    rel = train.relative_to(audited.resolve())
    assert f"{rel}/provenance.json: config and upstream keys recorded here do not hash" in proc.stdout
    # the stages built from it recorded its old checksum
    assert f"{rel}/provenance.json: changed since" in proc.stdout


def test_audit_without_a_report(repo):
    proc = dflash(repo, "audit", "smoke")
    assert proc.returncode == 2 and "no report" in proc.stderr and "snakemake smoke" in proc.stderr


def test_gc_lists_and_removes_only_unreferenced(repo):
    plan = json.loads(dflash(repo, "plan", "smoke", "--json").stdout)
    used = repo / next(r["dir"] for r in plan if r["stage"] == "train")
    res = repo / "results"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()                        # a pid no process has now
    unused = [res / "train" / "0123456789ab", res / "bench" / f".tmp-0123456789ab-{dead}", res / "reports" / "gone",
              res / "checkpoints" / "train-0123456789ab", res / "phases" / "smoke" / "oldrun",
              res / "logs" / "train" / "0123456789ab.log"]
    keep = [used, res / "checkpoints" / f"train-{used.name}", res / "reports" / "smoke",
            res / "logs" / "train" / f"{used.name}.log"]
    for p in unused + keep:
        if p.suffix == ".log":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("log\n")
        else:
            p.mkdir(parents=True)
            (p / "file").write_text("x" * 100)
    proc = dflash(repo, "gc")
    assert proc.returncode == 0
    listed = {line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("unreferenced")}
    assert listed == {str(p.relative_to(repo)) for p in unused}
    assert all(p.exists() for p in unused)                     # listing removes nothing
    proc = dflash(repo, "gc", "--delete")
    assert proc.returncode == 0 and f"{len(unused)} paths" in proc.stdout
    assert not any(p.exists() for p in unused) and all(p.exists() for p in keep)
    assert "nothing unreferenced" in dflash(repo, "gc").stdout


def test_a_published_copy_audits_without_its_weights(audited):
    """`dflash publish` copies the report and its chain minus weights; the audit of the copy passes, counts the
    weights as left out, and still catches a changed record or a weights file that nothing lists."""
    proc = dflash(audited, "publish", "smoke", "docs/results/smoke")
    assert proc.returncode == 0, proc.stderr
    pub = audited / "docs" / "results" / "smoke"
    (pub / "README.md").write_text("note\n")
    assert dflash(audited, "publish", "smoke", "docs/results/smoke").returncode == 0     # republish keeps the note
    assert (pub / "README.md").read_text() == "note\n"
    files = [p for p in pub.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".safetensors", ".pt", ".bin")]
    assert (pub / "reports" / "smoke" / "report.md").is_file() and (pub / "reports" / "smoke" / "tables").is_dir()
    omitted = json.loads((pub / "omitted.json").read_text())["files"]
    assert any(k.startswith("convert/") and k.endswith("model.safetensors") for k in omitted)
    assert all(k.split("/")[0] in ("target", "train", "convert", "tokenize") for k in omitted)

    proc = dflash(audited, "audit", "smoke", "--results", "docs/results/smoke")
    assert proc.returncode == 0, proc.stdout
    head = proc.stdout.splitlines()[0]
    assert head.endswith(": OK") and f"({len(omitted)} weights files not published" in head
    assert int(re.findall(r"(\d+) table cells", head)[0]) >= 50

    rec = next((pub / "bench").glob("*/records.jsonl"))
    rec.write_text(rec.read_text().replace('"accept_lengths": [', '"accept_lengths": [1, ', 1))
    name = next(k for k in omitted if k.startswith("convert/"))
    data = json.loads((pub / "omitted.json").read_text())
    del data["files"][name]
    (pub / "omitted.json").write_text(json.dumps(data))
    proc = dflash(audited, "audit", "smoke", "--results", "docs/results/smoke")
    assert proc.returncode == 1
    assert f"docs/results/smoke/{rec.relative_to(pub)}: sha256" in proc.stdout
    assert f"docs/results/smoke/{name}: missing" in proc.stdout


def test_publish_refuses_a_changed_file(audited):
    rel = _bench_dir(audited) / "summary.json"
    (audited / rel).write_text((audited / rel).read_text() + " ")
    proc = dflash(audited, "publish", "smoke", "docs/results/smoke")
    assert proc.returncode == 2 and f"{rel}: missing or changed" in proc.stderr
    assert not (audited / "docs" / "results" / "smoke").exists()
    assert not list((audited / "docs" / "results").glob(".tmp-*"))
