"""Local GPU slots: which GPUs a job started outside a scheduler runs on.

On one machine, Snakemake's `--resources gpu=N` caps how many GPUs the running jobs ask for in all, but hands no job a
device: every job would start on GPU 0 (in the first SmolLM2 run, 14 bench jobs shared one card while the other
idled). A job whose stage asks for G GPUs therefore claims G free slots, one lock file per GPU under
`results/.gpu-slots/` held with `flock` for the life of the process (an exec'd launcher such as torchrun inherits
it; a killed job frees it with its process), and sees only those devices through `CUDA_VISIBLE_DEVICES`. A job that
finds fewer free slots than it needs waits for them, so jobs never share a GPU even without `--resources`.

Nothing is claimed under Slurm (the allocation names the devices), when `CUDA_VISIBLE_DEVICES` is already set, in a
rank of a distributed launcher (`LOCAL_RANK`: its launcher claimed), when the stage asks for no GPU, or on a machine
without NVIDIA GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dflash.processes import try_lock

SLOTS_DIR = ".gpu-slots"
PROC_GPUS = Path("/proc/driver/nvidia/gpus")


def machine_gpus() -> int:
    """NVIDIA GPUs of this machine, counted without initialising CUDA in this process (a CUDA context would
    ignore a later CUDA_VISIBLE_DEVICES)."""
    if PROC_GPUS.is_dir():
        return len(list(PROC_GPUS.iterdir()))
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def claim(results_root: Path, gpus: int, env=None, total: int | None = None, poll_s: float = 1.0,
          log=sys.stderr) -> list[int]:
    """Claim `gpus` free slots of this machine and set CUDA_VISIBLE_DEVICES in `env` (default os.environ) to them;
    the locks last as long as this process (and any process it execs). Returns the GPU indices, [] if nothing was
    claimed (see the module docstring)."""
    env = os.environ if env is None else env
    if gpus <= 0 or any(env.get(v) is not None for v in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "LOCAL_RANK")):
        return []
    total = machine_gpus() if total is None else total
    if total == 0:
        return []
    if gpus > total:
        raise ValueError(f"the stage asks for {gpus} GPUs and this machine has {total} (resources.*.gpus)")
    slots = Path(results_root) / SLOTS_DIR
    slots.mkdir(parents=True, exist_ok=True)
    held: dict[int, int] = {}
    waited = False
    while True:
        for i in range(total):
            if i not in held and len(held) < gpus and (fd := try_lock(slots / f"{i}.lock")) is not None:
                held[i] = fd
        if len(held) == gpus:
            break
        for fd in held.values():            # all or nothing, so two waiting jobs never hold half each
            os.close(fd)
        held.clear()
        if not waited:
            print(f"dflash: waiting for {gpus} free GPU slot(s) of {total} ({slots})", file=log, flush=True)
            waited = True
        time.sleep(poll_s)
    ids = sorted(held)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
    print(f"dflash: GPU slot(s) {env['CUDA_VISIBLE_DEVICES']} (CUDA_VISIBLE_DEVICES)", file=log, flush=True)
    return ids
