"""convert: the trained drafter as `model.safetensors` + `config.json` in the z-lab / SGLang draft format."""

from __future__ import annotations

from dflash.modeling.drafter import load_trained


def run(ctx) -> dict:
    dtype = ctx.config["convert"]["dtype"]
    drafter = load_trained(ctx.upstream["train"])
    drafter.save(ctx.out, dtype)
    n = sum(p.numel() for p in drafter.parameters())
    ctx.log(f"convert: {n} parameters as {dtype} safetensors")
    return {"summary": {"parameters": n, "dtype": dtype}}
