"""Training checkpoints: torch DCP (sharded) model + optimizer per step, checksummed, newest intact one resumed."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from dflash.checksums import tree_checksums
from dflash.training.distributed import barrier


def checkpoints(work: Path) -> list[Path]:
    return sorted(work.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(work: Path, step: int, drafter, opt, meta: dict, keep_last: int, rank: int, world: int) -> None:
    """DCP-sharded model + optimizer into a temporary directory, checksums in meta.json, then rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final = work / f".tmp-step-{step:08d}", work / f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_sd, optim_sd = get_state_dict(drafter, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier(world)
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world,
                                                   "files": tree_checksums(tmp)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(work)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)


def find_checkpoint(work: Path, log=print) -> Path | None:
    """The newest checkpoint whose files match the checksums in its meta.json; others are reported and skipped."""
    for ckpt in reversed(checkpoints(work)):
        meta_file = ckpt / "meta.json"
        if not meta_file.is_file():
            log(f"train: checkpoint {ckpt} is partial (no meta.json), skipped")
            continue
        try:
            meta = json.loads(meta_file.read_text())
            files, _, _ = dict(meta["files"]), int(meta["step"]), int(meta["invalid_steps"])
        except (ValueError, KeyError, TypeError) as e:
            log(f"train: checkpoint {ckpt} has an unreadable meta.json ({e!r}), skipped")
            continue
        actual = {k: v for k, v in tree_checksums(ckpt).items() if k != "meta.json"}
        if actual != files:
            bad = sorted(k for k in set(files) | set(actual) if files.get(k) != actual.get(k))
            log(f"train: checkpoint {ckpt} is corrupt (checksum mismatch in {', '.join(bad)}), skipped")
            continue
        return ckpt
    return None


def load_checkpoint(ckpt: Path, drafter, opt) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(drafter, opt)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(drafter, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((ckpt / "meta.json").read_text())
