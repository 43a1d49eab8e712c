"""Run one stage instance: check its inputs, build its output in a temporary directory, write provenance, rename
into place. A failure leaves no output: `results/<stage>/<key>/` (and `results/reports/<phase>/`) only ever hold
complete outputs. Stages that resume (train, regenerate) keep their work under `results/checkpoints/<stage>-<key>/`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dflash.checksums import sha256_file
from dflash.errors import InputError
from dflash.modeling.target import embedding_rows
from dflash.plan.config import check_mask_id
from dflash.plan.keys import Registry, StageInstance
from dflash.plan.paths import ResultsTree
from dflash.plan.stages import BY_NAME
from dflash.processes import lock_holder, try_lock
from dflash.results import provenance, publish


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Shared:
    """What the instances of one job share: engines (a loaded model, a server) opened once, by the first instance
    that needs one, and closed when the job ends (its last instance done, failed or killed); `log_dir` holds the
    logs of what outlives one instance (server logs)."""

    def __init__(self, log_dir: Path, keys: list[str] | None = None, engine: str | None = None):
        self.log_dir = Path(log_dir)
        self.job = {"command": list(sys.argv), "pid": os.getpid(), "keys": list(keys or []), "engine_key": engine}
        self.started: list[str] = []            # names of the engines opened so far, in order
        self._stack = contextlib.ExitStack()
        self._open: dict[str, object] = {}

    def get(self, name: str, opener: Callable):
        """The engine `name`, opened with `opener()` (a context manager) the first time."""
        if name not in self._open:
            self._open[name] = self._stack.enter_context(opener())
            self.started.append(name)
        return self._open[name]

    def close(self) -> None:
        self._stack.close()


@dataclass
class Context:
    """What a stage's `run(ctx)` gets."""

    config: dict                   # the config fields the stage reads (what its key hashes)
    out: Path                      # the (temporary) output directory to fill
    upstream: dict[str, Path]      # upstream stage name -> its directory
    work: Path                     # resumable work directory (results/checkpoints/<stage>-<key>)
    log: Callable[[str], None] = log
    logging: dict = field(default_factory=dict)     # observability settings (wandb, progress; not in the key)
    registry: Registry | None = None                # the report reads its phase's plans from it
    run: dict = field(default_factory=dict)         # the full config of a run that uses the instance (bench reads
                                                    # where a pretrained drafter lives; its key hashes the files)
    shared: Shared | None = None                    # engines shared with the job's other instances


def verify_inputs(results: ResultsTree, inst: StageInstance) -> dict[str, str]:
    """Check the output files of the upstream stages this stage reads against the sha256 their provenance records;
    the checksums of what it reads: '<stage>/<key>' (the provenance.json) and '<stage>/<key>/<file>'."""
    reads = BY_NAME[inst.stage].upstream_names()
    omitted = publish.omitted_files(results.root)          # weights a published tree leaves out
    inputs = {}
    for stage, key in inst.inputs():
        d = results.stage_dir(stage, key)
        if not (d / provenance.PROVENANCE).is_file():
            raise InputError(f"{inst.stage} {inst.key}: input {d} is missing or incomplete "
                             f"(no {provenance.PROVENANCE}); run its {stage} stage first")
        inputs[f"{stage}/{key}"] = sha256_file(d / provenance.PROVENANCE)
        if stage not in reads:
            continue
        for rel, digest in provenance.read(d)["outputs"].items():
            f = d / rel
            if not f.is_file() and omitted.get(f"{stage}/{key}/{rel}") == digest:
                continue
            actual = sha256_file(f) if f.is_file() else None
            if actual != digest:
                what = "is missing" if actual is None else "changed since its stage wrote it (sha256 differs)"
                raise InputError(f"{inst.stage} {inst.key}: input {f} {what}; remove {d} and rerun its {stage} "
                                 f"stage (`snakemake` reruns it)")
            inputs[f"{stage}/{key}/{rel}"] = digest
    return inputs


def check_mask_ids(reg: Registry, inst: StageInstance, upstream: dict[str, Path]) -> None:
    """Before a stage that loads the target does any work: the `drafter.mask_token_id` of every run that uses this
    instance must be a row of the target's embedding (the plan checks it already where the target's size is known
    without running anything)."""
    given = [(p, r, reg.phases[p].runs[r]["drafter"].get("mask_token_id")) for p, r in inst.users
             if p in reg.phases and r in reg.phases[p].runs]
    given = [g for g in given if g[2] is not None]
    if given and "target" in upstream:
        rows = embedding_rows(upstream["target"])
        for phase, run, mask_id in given:
            check_mask_id(mask_id, rows, f"{reg.phases[phase].file}: runs.{run}.drafter")


LOCK_ENV = "DFLASH_STAGE_LOCK"     # '<stage>/<key> ...' whose locks this process (or the launcher it runs under) holds


def lock(results: ResultsTree, stage: str, key: str) -> None:
    """Hold the lock of this stage instance for the life of this process and what it execs (torchrun, a Ray launch
    script): one writer per instance. Another holder (e.g. the job of a killed Snakemake) fails this one, naming it;
    its death frees the lock. The ranks of a distributed launch run under their launcher's lock."""
    held = os.environ.get(LOCK_ENV, "").split()
    if f"{stage}/{key}" in held or int(os.environ.get("RANK", "0")) != 0:
        return
    path = results.lock_file(stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if try_lock(path) is None:
        raise InputError(f"{stage} {key} is being built by {lock_holder(path)} (lock {path}); let it finish or stop "
                         "it, then rerun")
    os.environ[LOCK_ENV] = " ".join([*held, f"{stage}/{key}"])


def module(stage: str):
    return importlib.import_module(f"dflash.stages.{stage}")


def run(reg: Registry, stage: str, key: str, shared: Shared | None = None) -> Path:
    """Run a stage instance. Under a distributed launcher (RANK set), every rank runs the stage; only rank 0
    writes and publishes the output directory."""
    inst = reg.get(stage, key)
    lock(reg.results, stage, key)
    inputs = verify_inputs(reg.results, inst)
    upstream = {s: reg.results.stage_dir(s, k) for s, k in inst.upstream.items() if isinstance(k, str)}
    work = reg.results.work_dir(stage, key)
    run_config = next((reg.phases[p].runs[r] for p, r in inst.users if r in reg.phases[p].runs), {})
    check_mask_ids(reg, inst, upstream)
    own = shared is None
    shared = shared or Shared(reg.results.logs / "engines" / f"{stage}-{key}", [key])

    def context(out: Path) -> Context:
        return Context(inst.config, out, upstream, work, log, {**inst.logging, "key": key}, reg, run_config, shared)

    try:
        if int(os.environ.get("RANK", "0")) != 0:
            scratch = Path(tempfile.mkdtemp(prefix=f"dflash-{stage}-{key}-rank"))
            try:
                module(stage).run(context(scratch))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return inst.dir
        started = provenance.now()
        with provenance.atomic_dir(inst.dir) as tmp:
            result = module(stage).run(context(tmp)) or {}
            inputs.update(result.get("inputs", {}))
            provenance.write(tmp, provenance.record(stage, key, BY_NAME[stage].version, inst.config, inst.upstream,
                                                    tmp, started, inputs, result.get("summary", {}), inst.users))
        return inst.dir
    finally:
        if own:
            shared.close()


def run_many(reg: Registry, stage: str, keys: list[str], engine: str | None = None) -> list[Path]:
    """Several instances of one stage in one process, sharing their engines (`Shared`): the datasets of one run
    on one loaded model or server. Every instance's inputs are checked before the first starts; an instance whose
    directory is complete already is kept as it is (its provenance.json touched: a rerun after a kill resumes
    there, and Snakemake, which keeps such outputs of these jobs, sees them written); each is written atomically."""
    for key in keys:
        verify_inputs(reg.results, reg.get(stage, key))
    shared = Shared(reg.results.logs / "engines" / f"{stage}-{engine or keys[0]}", keys, engine)
    out = []
    try:
        for key in keys:
            d = reg.get(stage, key).dir
            if (d / provenance.PROVENANCE).is_file():
                log(f"{stage} {key}: complete already, kept")
                os.utime(d / provenance.PROVENANCE)         # for Snakemake, the job wrote it
            else:
                run(reg, stage, key, shared)
            out.append(d)
    finally:
        shared.close()
    return out
