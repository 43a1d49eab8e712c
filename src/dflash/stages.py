"""Run one stage instance: build its output in a temporary directory, write provenance, rename into place.

A failure removes the temporary directory, so `results/<stage>/<key>/` only ever holds complete outputs.
Stages that resume (train, regenerate) keep their work under `results/checkpoints/<stage>-<key>/`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from dflash import provenance
from dflash.paths import checkpoints_dir, stage_dir
from dflash.registry import Registry, StageInstance


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _call(inst: StageInstance, tmp: Path, upstream: dict[str, Path]) -> dict:
    work = checkpoints_dir() / f"{inst.stage}-{inst.key}"
    if inst.stage == "target":
        from dflash import target
        return target.build(inst.config["target"], tmp, _log)
    if inst.stage == "prepare":
        from dflash import prepare
        return prepare.run(inst.config, tmp, _log)
    if inst.stage == "regenerate":
        from dflash import regenerate
        return regenerate.run(inst.config, tmp, upstream, work, _log)
    if inst.stage == "tokenize":
        from dflash import tokenization
        return tokenization.run(inst.config, tmp, upstream, _log)
    if inst.stage == "train":
        from dflash import train
        return train.run(inst.config, tmp.resolve(), upstream, work.resolve(), _log, inst.logging)
    if inst.stage == "convert":
        from dflash import convert
        return convert.run(inst.config, tmp, upstream, _log)
    if inst.stage == "bench":
        from dflash import bench
        return bench.run(inst.config, tmp, upstream, _log)
    raise ValueError(f"unknown stage {inst.stage!r}")


def upstream_dirs(inst: StageInstance) -> dict[str, Path]:
    dirs = {}
    for stage, key in inst.upstream.items():
        d = stage_dir(stage, key)
        if not (d / provenance.PROVENANCE).is_file():
            raise FileNotFoundError(f"{inst.stage} {inst.key}: input {d} is missing or incomplete "
                                    f"(no {provenance.PROVENANCE}); run its {stage} stage first")
        dirs[stage] = d
    return dirs


def publish(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an empty placeholder (made by Snakemake) is replaced."""
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            shutil.rmtree(final)
    os.replace(tmp, final)


def run(reg: Registry, stage: str, key: str) -> Path:
    """Run a stage instance. Under a distributed launcher (RANK set), every rank runs the stage; only rank 0
    writes and publishes the output directory."""
    inst = reg.get(stage, key)
    final = inst.dir
    upstream = upstream_dirs(inst)
    if int(os.environ.get("RANK", "0")) != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"dflash-{stage}-{key}-rank"))
        try:
            _call(inst, scratch, upstream)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    started = provenance.now()
    try:
        result = _call(inst, tmp, upstream) or {}
        inputs = provenance.stage_checksums(inst.upstream.items())
        inputs.update(result.get("inputs", {}))
        provenance.write(tmp, provenance.record(stage, key, inst.config, inst.upstream, tmp, started, inputs,
                                                result.get("summary", {}), inst.users))
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        raise
    return final
