"""`dflash status <phase>`: done / running (pid, elapsed, the log's last progress line) / waiting, from the tree."""

from __future__ import annotations

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
        proc = dflash(repo, "status", "smoke")
        rows = {r["name"]: r for r in json.loads(dflash(repo, "status", "smoke", "--json").stdout)}
    finally:
        builder.kill()
        builder.wait()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "phase smoke: 1 done, 1 running, 8 waiting (logs: results/logs/<stage>/<key>.log)"
    running = next(line for line in lines if line.split()[:2] == ["running", "train"])
    assert f"pid {builder.pid}" in running and running.endswith("train:  41%|####      | 93/226 [00:31<00:44]")
    assert rows["target"]["state"] == "done" and rows["tokenize"]["state"] == "waiting"
    assert rows["train"]["state"] == "running" and 0 <= rows["train"]["elapsed_s"] < 60
    assert rows["report"]["state"] == "waiting" and rows["bench/synthetic_math"]["runs"] == ["main"]
