"""Local GPU slots (dflash.launch.gpus): concurrent local jobs get distinct GPUs, wait when none is free, and free
their slot when they exit, killed or not. Real processes and real flock locks; the GPU count is given."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dflash.launch.gpus import claim

HOLDER = """
import os, sys, time
from dflash.launch.gpus import claim
ids = claim(sys.argv[1], int(sys.argv[2]), total=2, poll_s=0.05)
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(float(sys.argv[3]))
"""


def holder(root, gpus, hold_s):
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(gpus), str(hold_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items()
                                                                    if k != "CUDA_VISIBLE_DEVICES"})


def test_jobs_get_distinct_gpus_and_wait_for_a_free_one(tmp_path):
    a = holder(tmp_path, 1, 60)
    assert a.stdout.readline().strip() == "0"
    b = holder(tmp_path, 1, 0)
    assert b.stdout.readline().strip() == "1"
    b.wait()
    c = holder(tmp_path, 1, 60)                         # slot 1 is free again once b exited
    assert c.stdout.readline().strip() == "1"
    d = holder(tmp_path, 1, 0)                          # none free: waits until a is killed
    time.sleep(1.0)
    assert d.poll() is None
    a.kill()
    assert d.stdout.readline().strip() == "0" and d.wait(30) == 0
    assert "waiting for 1 free GPU slot" in d.stderr.read()
    c.kill()


def test_a_two_gpu_job_takes_both_or_waits(tmp_path):
    a = holder(tmp_path, 1, 60)
    assert a.stdout.readline().strip() == "0"
    both = holder(tmp_path, 2, 0)
    time.sleep(1.0)
    assert both.poll() is None                          # holds nothing while it waits
    one = holder(tmp_path, 1, 0)
    assert one.stdout.readline().strip() == "1" and one.wait(30) == 0
    a.kill()
    assert both.stdout.readline().strip() == "0,1" and both.wait(30) == 0


@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "7"}, {"CUDA_VISIBLE_DEVICES": "3"}, {"LOCAL_RANK": "0"}])
def test_nothing_claimed_where_devices_are_already_placed(tmp_path, env):
    before = dict(env)
    assert claim(tmp_path, 1, env=env, total=2) == [] and env == before
    assert not (tmp_path / ".gpu-slots").exists()


def test_no_gpu_asked_or_none_present(tmp_path):
    env = {}
    assert claim(tmp_path, 0, env=env, total=2) == [] and claim(tmp_path, 1, env=env, total=0) == [] and env == {}
    with pytest.raises(ValueError, match="asks for 3 GPUs and this machine has 2"):
        claim(tmp_path, 3, env={}, total=2)
