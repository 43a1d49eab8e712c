"""Regeneration: resume after a kill (HF engine, a real subprocess killed mid-run), the sglang engine's fallback to
HF on a machine without sglang/GPU, and SGLang replicas (local processes and Ray actors) against fake servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sglang_engine import build_tiny_target, fake_server_command, write_fake_server

from dflash.decoding import sglang as sglang_engine
from dflash.stages import prepare, regenerate
from dflash.stages.runner import Context

N_PROMPTS, CHUNK = 10, 4            # three chunks: 4 + 4 + 2


def _cfg(engine: str = "hf", **sglang) -> dict:
    # sampled (T=1) so that the random tiny target writes varied text and resume must reproduce the RNG stream
    rc = {"enabled": True, "engine": engine, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 4,
          "system_prompt": None, "seed": 0, "chunk_size": CHUNK}
    if sglang:
        rc["sglang"] = sglang
    return {"regenerate": rc}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("regen")
    target = build_tiny_target(root / "target")
    prep = root / "prepare"
    prep.mkdir()
    with open(prep / prepare.OUTPUT, "w") as f:
        for i in range(N_PROMPTS):
            msgs = [{"role": "user", "content": f"what is {i} plus {i + 3}?"}, {"role": "assistant", "content": "x"}]
            f.write(json.dumps({"id": f"p{i}", "source": "test", "messages": msgs}) + "\n")
    return {"target": target, "prepare": prep}


@pytest.fixture(scope="module")
def reference(upstream, tmp_path_factory) -> tuple[str, dict]:
    """An uninterrupted HF run: the output every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    (root / "out").mkdir()
    result = regenerate.run(Context(_cfg(), root / "out", upstream, root / "work", log=lambda *_: None))
    return (root / "out" / prepare.OUTPUT).read_text(), result["summary"]


def _run(upstream, tmp_path: Path, cfg: dict, name: str = "out", work: str = "work") -> tuple[str, dict]:
    out = tmp_path / name
    out.mkdir()
    result = regenerate.run(Context(cfg, out, upstream, tmp_path / work, log=lambda *_: None))
    return (out / prepare.OUTPUT).read_text(), result["summary"]


KILLED_RUN = r'''
import json, sys, time
from pathlib import Path
from dflash.stages import regenerate
from dflash.stages.runner import Context

generate = regenerate._generate


def slow(*args, **kwargs):          # every batch takes a while, so the kill lands inside the second chunk
    out = generate(*args, **kwargs)
    time.sleep(1.5)
    return out


regenerate._generate = slow
cfg, out, target, prep, work = json.loads(sys.argv[1]), *map(Path, sys.argv[2:6])
regenerate.run(Context(cfg, out, {"target": target, "prepare": prep}, work))
'''


def test_resume_after_kill_gives_the_uninterrupted_output(upstream, reference, tmp_path):
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    work, out = tmp_path / "work", tmp_path / "killed-out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(_cfg()), str(out), str(upstream["target"]),
                             str(upstream["prepare"]), str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not regenerate.chunk_file(work, 0).is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no chunk written within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not regenerate.chunk_file(work, 1).is_file()          # killed inside the second chunk
    first = regenerate.chunk_file(work, 0).read_text()

    text, summary = _run(upstream, tmp_path, _cfg())
    ref_text, ref_summary = reference
    assert text == ref_text                                      # complete and identical to an uninterrupted run
    assert len(text.splitlines()) == N_PROMPTS
    assert summary["chunks"] == 3 and summary["chunks_resumed"] == 1 and summary["chunks_generated"] == 2
    assert regenerate.chunk_file(work, 0).read_text() == first   # the finished chunk was not redone
    assert summary["total_tokens"] == ref_summary["total_tokens"] and summary["new_tokens"] < summary["total_tokens"]
    assert summary["engine"] == "hf" and summary["tokens_per_s"] > 0

    again_text, again = _run(upstream, tmp_path, _cfg(), name="again")   # all done: nothing is generated
    assert again_text == ref_text and again["chunks_resumed"] == 3 and again["new_tokens"] == 0


def test_changed_chunk_size_is_refused(upstream, tmp_path):
    _run(upstream, tmp_path, _cfg())
    cfg = _cfg()
    cfg["regenerate"]["chunk_size"] = 3
    with pytest.raises(ValueError, match="another layout"):
        _run(upstream, tmp_path, cfg, name="out2")


def test_sglang_engine_falls_back_to_hf_without_sglang(upstream, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(sglang_engine, "sglang_installed", lambda: False)
    text, summary = _run(upstream, tmp_path, _cfg("sglang"))
    assert text == reference[0]
    assert summary["engine"] == "hf" and summary["engine_requested"] == "sglang"
    assert "sglang" in summary["fallback"] and summary["chunk_engines"] == ["hf"]


@pytest.fixture
def fake_sglang(tmp_path, monkeypatch) -> Path:
    """sglang 'available' on two 'GPUs', servers replaced by the fake one."""
    script = write_fake_server(tmp_path)
    monkeypatch.setattr(sglang_engine, "unavailable_reason", lambda need_gpu=True: None)
    monkeypatch.setattr(sglang_engine, "gpu_count", lambda: 2)
    monkeypatch.setattr(sglang_engine, "server_command", fake_server_command(script))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return script


def _check_sglang_output(text: str, upstream) -> None:
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(N_PROMPTS)]
    for r in rows:
        user, reply = r["messages"]
        assert user["role"] == "user" and reply["role"] == "assistant" and reply["content"].startswith("w")


def test_sglang_replicas_in_local_processes_resume(upstream, fake_sglang, tmp_path):
    text, summary = _run(upstream, tmp_path, _cfg("sglang", use_ray=False))
    _check_sglang_output(text, upstream)
    assert summary["engine"] == "sglang" and summary["fallback"] is None and summary["replicas"] == 2
    assert summary["ray"] is False and summary["chunk_engines"] == ["sglang"] and summary["concurrency"] == 4
    assert summary["new_tokens"] == summary["total_tokens"] > 0 and summary["tokens_per_s"] > 0
    logs = sorted((tmp_path / "work" / "server-logs").glob("replica-*.log"))
    assert [log.read_text().split("\n")[1] for log in logs] == ["fake sglang starting 0", "fake sglang starting 1"]

    regenerate.chunk_file(tmp_path / "work", 1).unlink()          # as if killed before chunk 1 was written
    again, resumed = _run(upstream, tmp_path, _cfg("sglang", use_ray=False), name="again")
    assert again == text and resumed["chunks_resumed"] == 2 and resumed["chunks_generated"] == 1
    assert resumed["replicas"] == 1                               # never more servers than chunks to do


def test_sglang_replicas_as_ray_actors(upstream, fake_sglang, tmp_path):
    ray = pytest.importorskip("ray")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        text, summary = _run(upstream, tmp_path, _cfg("sglang", use_ray=True))
    finally:
        ray.shutdown()
    _check_sglang_output(text, upstream)
    assert summary["ray"] is True and summary["replicas"] == 2 and summary["engine"] == "sglang"
    logs = sorted((tmp_path / "work" / "server-logs").glob("replica-*.log"))
    assert {log.read_text().split("\n")[1] for log in logs} == {"fake sglang starting 0", "fake sglang starting 1"}
