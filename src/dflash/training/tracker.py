"""Training observability: metrics.jsonl, a progress bar, wandb."""

from __future__ import annotations

from pathlib import Path

from dflash.data.jsonl import jsonl_line


class Tracker:
    """metrics.jsonl (rank 0), a progress bar, and wandb when enabled: project and run named by phase and run, the
    stage key, phase and run in its config, its files under the stage's work directory (`wandb/`), one wandb run
    id per stage key so that a resumed stage continues its run."""

    def __init__(self, path: Path, tracking: dict, config: dict, steps: int, start: int, rank: int, log):
        self.rank, self.log = rank, log
        self.file = open(path, "a") if rank == 0 else None
        self.bar = self.wandb = self.run_dir = None
        if rank == 0 and tracking.get("progress", True):
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, unit="step", mininterval=5.0, dynamic_ncols=True)
        if rank == 0 and tracking.get("wandb", "off") != "off":
            try:
                import wandb
            except ImportError:
                raise ImportError("logging.wandb is set but wandb is missing: pip install -e '.[wandb]'") from None
            phase, run, key = tracking.get("phase", "dflash"), tracking.get("run", "run"), tracking.get("key")
            root = Path(path).parent / "wandb"
            root.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=tracking.get("wandb_project") or f"dflash-{phase}", name=f"{phase}/{run}",
                                    id=f"train-{key}" if key else None, dir=str(root), mode=tracking["wandb"],
                                    config={"stage": "train", "stage_key": key, "phase": phase, "run": run, **config},
                                    resume="allow")
            self.run_dir = Path(self.wandb.dir).parent        # <root>/wandb/<mode>-run-<time>-<id>/

    def step(self, rec: dict | None) -> None:
        if self.rank != 0:
            return
        if self.bar:
            self.bar.update(1)
        if rec is None:
            return
        self.file.write(jsonl_line(rec))
        self.file.flush()
        if self.bar:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
        if self.wandb:
            self.wandb.log({k: v for k, v in rec.items() if k != "acc_per_position"}, step=rec["step"])
        self.log(f"step {rec['step']} loss {rec['loss']:.4f} acc {rec['acc']:.3f} lr {rec['lr']:.2e} "
                 f"{rec['samples_per_s']:.1f} samples/s")

    def close(self) -> None:
        for x in (self.bar, self.file):
            if x:
                x.close()
        if self.wandb:
            self.wandb.finish()
