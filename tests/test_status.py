"""`dflash status <phase>`: done / running (pid, elapsed, the log's last progress line) / waiting, from the tree."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

from conftest import dflash


def test_status_shows_done_running_and_waiting(repo):
    plan = {r["stage"] + r.get("dataset", ""): r["key"] for r in json.loads(dflash(repo, "plan", "smoke",
                                                                                    "--json").stdout)}
    results = repo / "results"
    (results / "target" / plan["target"]).mkdir(parents=True)
    (results / "target" / plan["target"] / "provenance.json").write_text("{}")
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (results / "train" / f".tmp-{plan['train']}-{builder.pid}").mkdir(parents=True)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        (results / "tokenize" / f".tmp-{plan['tokenize']}-{dead}").mkdir(parents=True)     # a killed job's leftover
        log = results / "logs" / "train" / f"{plan['train']}.log"
        log.parent.mkdir(parents=True)
        log.write_text("train: 900 rows, 226 steps\ntrain:  40%|####      | 90/226 [00:30<00:45]\r"
                       "train:  41%|####      | 93/226 [00:31<00:44]\r\n\n")
        snake = repo / ".snakemake"                  # a running workflow started convert's job (no tmp dir yet)
        (snake / "locks").mkdir(parents=True)
        (snake / "locks" / "0.input.lock").write_text("results/train\n")
        (snake / "incomplete").mkdir()
        out = f"results/convert/{plan['convert']}/provenance.json"
        (snake / "incomplete" / base64.b64encode(out.encode()).decode()).write_text("")
        proc = dflash(repo, "status", "smoke")
        rows = {r["name"]: r for r in json.loads(dflash(repo, "status", "smoke", "--json").stdout)}
    finally:
        builder.kill()
        builder.wait()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "phase smoke: 1 done, 2 running, 10 waiting (logs: results/logs/<stage>/<key>.log)"
    running = next(line for line in lines if line.split()[:2] == ["running", "train"])
    assert f"pid {builder.pid}" in running and running.endswith("train:  41%|####      | 93/226 [00:31<00:44]")
    assert rows["target"]["state"] == "done" and rows["tokenize"]["state"] == "waiting"
    assert rows["train"]["state"] == "running" and 0 <= rows["train"]["elapsed_s"] < 60
    assert rows["convert"]["state"] == "running" and rows["convert"]["pid"] is None
    assert any(line.split()[:2] == ["running", "convert"] and "started by Snakemake" in line for line in lines)
    assert rows["report"]["state"] == "waiting" and rows["bench/synthetic_math"]["runs"] == ["main"]
