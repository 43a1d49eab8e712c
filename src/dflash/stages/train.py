"""train: the DFlash drafter trained on the target's hidden states (`dflash.training.loop`), in this process or
its torchrun rank, or in Ray Train workers when the launcher started a Ray cluster (DFLASH_LAUNCHER=ray)."""

from __future__ import annotations

import os

from dflash.training.loop import train


def run(ctx) -> dict:
    if os.environ.get("DFLASH_LAUNCHER") == "ray" and "RANK" not in os.environ:
        from dflash.training.ray_train import fit

        return fit(train, ctx.config, ctx.out, ctx.upstream, ctx.work, ctx.logging)
    return train(ctx.config, ctx.out.resolve(), ctx.upstream, ctx.work.resolve(), ctx.log, ctx.logging)
