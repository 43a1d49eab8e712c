"""Learning-rate schedules: the drafter's (linear warmup, then cosine to min_lr, WSD (warmup-stable-decay) or
constant) and the in-process target pretraining's (`pretrain_lr`)."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, cfg: dict) -> float:
    """Learning rate for optimizer step `step` (0-based) of a schedule `total` steps long."""
    peak, floor = cfg["lr"], cfg["min_lr"]
    warm = int(round(cfg["warmup_ratio"] * total))
    if step < warm:
        return peak * (step + 1) / warm
    if cfg["schedule"] == "constant":
        return peak
    if cfg["schedule"] == "cosine":
        frac = (step - warm) / max(1, total - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    decay = int(round(cfg["decay_ratio"] * total))
    start = total - decay
    if step < start:
        return peak
    frac = (step - start) / max(1, decay)
    shape = 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) if cfg["decay_style"] == "cosine" else 1 - min(1.0, frac)
    return floor + (peak - floor) * shape


def total_steps(num_rows: int, cfg: dict, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps, global batch): `max_steps` if set, else ceil(epochs * rows / global batch)."""
    global_batch = cfg["micro_batch_size"] * cfg["grad_accum"] * world_size
    if cfg["max_steps"]:
        return cfg["max_steps"], global_batch
    return max(1, math.ceil(cfg["epochs"] * num_rows / global_batch)), global_batch


def pretrain_lr(step: int, steps: int, peak: float) -> float:
    """The in-process target pretraining's learning rate (`training/target_pretrain.py`): linear warmup over
    max(1, steps // 20) steps, then cosine to zero. Not `lr_at`: its warmup rounds a ratio and it computes the cosine's
    angle in another order, so its values differ in the last bits, and the synthetic targets are kept bit-identical."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
