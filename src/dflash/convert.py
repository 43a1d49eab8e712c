"""convert: the trained drafter as `model.safetensors` + `config.json` in the z-lab / SGLang draft format."""

from __future__ import annotations

from pathlib import Path

from dflash.train import load_drafter


def run(cfg: dict, out: Path, upstream: dict[str, Path], log=print) -> dict:
    drafter = load_drafter(upstream["train"])
    drafter.save(out, cfg["convert"]["dtype"])
    n = sum(p.numel() for p in drafter.parameters())
    log(f"convert: {n} parameters as {cfg['convert']['dtype']} safetensors")
    return {"summary": {"parameters": n, "dtype": cfg["convert"]["dtype"]}}
