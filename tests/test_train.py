"""Trainer: schedules, resume after kill -9, corrupt checkpoints, FSDP2 under torchrun and Ray Train (gloo, 2 ranks)."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, env
from dflash.modeling.schedule import lr_at, total_steps
from dflash.training.checkpoints import find_checkpoint

BASE = {"lr": 1.0, "min_lr": 0.1, "warmup_ratio": 0.1, "decay_ratio": 0.2, "decay_style": "linear"}


def test_schedules():
    cos = {**BASE, "schedule": "cosine"}
    assert lr_at(0, 100, cos) == pytest.approx(0.1) and lr_at(9, 100, cos) == pytest.approx(1.0)
    assert lr_at(99, 100, cos) == pytest.approx(0.1, abs=1e-3) and lr_at(55, 100, cos) == pytest.approx(0.55, abs=0.01)
    wsd = {**BASE, "schedule": "wsd"}
    assert lr_at(50, 100, wsd) == 1.0 and lr_at(79, 100, wsd) == 1.0
    assert lr_at(90, 100, wsd) == pytest.approx(0.55) and lr_at(99, 100, wsd) == pytest.approx(0.145)
    assert lr_at(99, 100, {**BASE, "schedule": "constant"}) == 1.0
    cfg = {"micro_batch_size": 2, "grad_accum": 3, "max_steps": None, "epochs": 2}
    assert total_steps(100, cfg, world_size=2) == (17, 12)          # schedule length explicit, not silently cut
    assert total_steps(100, {**cfg, "max_steps": 1000}, 2) == (1000, 12)


@pytest.fixture
def work_repo(smoke_repo, tmp_path):
    """A copy of the finished smoke repository with a small extra phase whose train stage has not run."""
    repo = tmp_path / "repo"
    shutil.copytree(smoke_repo, repo, symlinks=True)
    return repo


def _phase(repo, name, train, resources=None):
    doc = {"extends": "smoke", "defaults": {"train": train, **({"resources": resources} if resources else {})}}
    (repo / "configs" / "phases" / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    plan = json.loads(subprocess.run([str(BIN / "dflash"), "plan", name, "--json"], cwd=repo, capture_output=True,
                                     text=True, env=env(), check=True).stdout)
    return next(r["key"] for r in plan if r["stage"] == "train")


def _stage(repo, key, extra_env=None, launcher=()):
    cmd = [*launcher, "-m", "dflash.cli", "stage", "train", key] if launcher else [str(BIN / "dflash"), "stage",
                                                                                  "train", key]
    return subprocess.Popen(cmd, cwd=repo, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_kill_9_then_rerun_resumes_to_same_step_count(work_repo):
    key = _phase(work_repo, "resume", {"max_steps": 40, "save_every": 5, "log_every": 1, "keep_last": 2})
    work = work_repo / "results" / "checkpoints" / f"train-{key}"
    proc = _stage(work_repo, key)
    deadline = time.time() + 120
    while not (work / "step-00000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work_repo / "results" / "train" / key / "provenance.json").exists()
    rerun = _stage(work_repo, key)
    out, _ = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, out
    assert "train: resumed from step" in out
    summary = json.loads((work_repo / "results" / "train" / key / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from"] >= 10
    steps = [json.loads(line)["step"] for line in open(work_repo / "results" / "train" / key / "metrics.jsonl")]
    assert steps == list(range(1, 41))
    assert len(list(work.glob("step-*"))) == 2                       # keep_last


def test_corrupt_checkpoint_is_skipped_with_message(work_repo):
    key = _phase(work_repo, "corrupt", {"max_steps": 6, "save_every": 2, "keep_last": 3})
    assert _stage(work_repo, key).wait(timeout=120) == 0
    work = work_repo / "results" / "checkpoints" / f"train-{key}"
    newest = sorted(work.glob("step-*"))[-1]
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    messages = []
    found = find_checkpoint(work, messages.append)
    assert found.name == "step-00000004"
    assert "step-00000006 is corrupt (checksum mismatch in __0_0.distcp)" in messages[0]
    (work / "step-00000004" / "meta.json").unlink()
    assert find_checkpoint(work, messages.append).name == "step-00000002" and "partial" in messages[-1]


def _two_rank_result(repo, key):
    summary = json.loads((repo / "results" / "train" / key / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["global_batch"] == 8
    metrics = [json.loads(line) for line in open(repo / "results" / "train" / key / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["loss"] > 0 for m in metrics)
    import torch

    state = torch.load(repo / "results" / "train" / key / "drafter.pt")
    assert "fc.weight" in state and state["fc.weight"].shape[1] == 2 * state["norm.weight"].shape[0]
    return summary


TWO_RANK = {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1, "save_every": 2}


def test_fsdp_under_torchrun_gloo_two_ranks(work_repo):
    key = _phase(work_repo, "torchrun2", TWO_RANK, {"train": {"gpus": 2}})
    proc = _stage(work_repo, key, launcher=(str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    _two_rank_result(work_repo, key)


def test_fsdp_under_ray_train_two_workers(work_repo):
    pytest.importorskip("ray.train", reason="Ray Train is the `ray` extra")
    key = _phase(work_repo, "ray2", TWO_RANK, {"train": {"gpus": 2, "launcher": "ray"}})
    proc = _stage(work_repo, key, {"DFLASH_LAUNCHER": "ray", "DFLASH_RAY_WORKERS": "2", "RAY_AUTH_MODE": "disabled",
                                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_object_store_memory": str(200 * 2**20)})
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    prov = json.loads((work_repo / "results" / "train" / key / "provenance.json").read_text())
    assert prov["summary"]["launcher"] == "ray" and prov["summary"]["ray_workers"] == 2
    _two_rank_result(work_repo, key)


def test_wandb_offline_run_holds_the_metrics_and_the_stage_identity(work_repo):
    """A short smoke train with logging.wandb offline: the offline run directory (listed in provenance) holds the
    logged metrics and the stage key, phase and run as config."""
    pytest.importorskip("wandb")
    doc = {"extends": "smoke", "defaults": {"train": {"max_steps": 4, "log_every": 1, "save_every": 4},
                                            "logging": {"wandb": "offline", "progress": False}}}
    (work_repo / "configs" / "phases" / "logged.yaml").write_text(yaml.safe_dump(doc))
    plan = json.loads(subprocess.run([str(BIN / "dflash"), "plan", "logged", "--json"], cwd=work_repo,
                                     capture_output=True, text=True, env=env(), check=True).stdout)
    key = next(r["key"] for r in plan if r["stage"] == "train")
    proc = subprocess.run([str(BIN / "dflash"), "stage", "train", key], cwd=work_repo, capture_output=True, text=True,
                          env={**env(), "WANDB_SILENT": "true"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads((work_repo / "results" / "train" / key / "provenance.json").read_text())
    run_dir = work_repo / prov["summary"]["wandb_run_dir"]
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-") and run_dir.name.endswith(f"train-{key}")
    config, logged = {}, []
    for rec in _wandb_records(next(run_dir.glob("*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "history":
            logged.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                           for item in rec.history.item})
    assert (config["stage_key"], config["phase"], config["run"]) == (key, "logged", "main")
    assert [h["_step"] for h in logged] == [1, 2, 3, 4] and all("loss" in h and "lr" in h for h in logged)


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                          # a whole record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out
