"""baseline: one dataset through the target alone (no drafter), as per-request records the bench stage reads.

Its key holds the target, the dataset and the decoding settings that change the target's output or its timing
(engine and its options, dtype, device, max new tokens, temperature, seed, system prompt, thinking), nothing of
the drafter: every run and phase with those in common shares one directory. `records.jsonl` holds one line per
(prompt, turn): prompt length and digest (`prompt_sha`), output token ids and count, prefill and decode times (for
the local engines also z-lab's clock, which for target-only decoding equals the decode time), and for SGLang the
client and server times. A later turn's prompt holds the target's own earlier answers. `summary.json` holds the
hardware, the engine (loaded or started once per job for all its datasets; `started_here` says whether this
dataset paid for it) and the time per output token.
"""

from __future__ import annotations

import json
import statistics

import torch

from dflash.data.benchmarks import load_prompts
from dflash.data.jsonl import write_jsonl
from dflash.decoding import sglang as sg
from dflash.stages import bench


def run(ctx) -> dict:
    if ctx.shared is None:
        with bench.own_engines(ctx) as own:
            return run(own)
    bc, ds = ctx.config["bench"], ctx.config["dataset"]
    if bc["engine"] == "sglang":
        sg.require_sglang()
    prompts, meta = load_prompts(ds)
    records, info = (_served if bc["engine"] == "sglang" else _local)(ctx, bc, ds, prompts)
    write_jsonl(ctx.out / "records.jsonl", records)
    tokens = sum(r["n_tokens"] for r in records)
    summary = {"dataset": ds["name"], "temperature": bc["temperature"], "n_requests": len(records),
               "tokens": tokens, "tpot_ms": 1e3 * statistics.fmean(r["decode_s"] / max(1, r["n_tokens"] - 1)
                                                                  for r in records),
               **info, "prompt_ids": meta["ids"], "source": meta["source"]}
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    ctx.log(f"baseline {ds['name']} ({info['backend']}): n={len(records)} tokens {tokens} "
            f"time per output token {summary['tpot_ms']:.2f} ms")
    inputs = {meta["source"]: meta["sha256"]} if meta.get("sha256") else {}
    return {"inputs": inputs, "summary": {k: v for k, v in summary.items() if k != "prompt_ids"}}


def _local(ctx, bc: dict, ds: dict, prompts):
    started = "local" not in ctx.shared.started
    le = ctx.shared.get("local", lambda: bench.local_engine(ctx, bc, None))
    engine, n_new, temp = le.engine, bc["max_new_tokens"], bc["temperature"]
    gen = torch.Generator(device=le.device).manual_seed(bc["seed"])
    c0 = (engine.capture_s, engine.captures)
    rows = bench.local_conversations(le, bc, prompts,
                                     lambda ids: engine.target_generate(ids, n_new, le.eos, temp, gen))
    records = []
    for r in rows:
        r.pop("gen")
        r.pop("prompt_ids")
        records.append({"dataset": ds["name"], **r})
    capture = (engine.capture_s - c0[0], engine.captures - c0[1])
    return records, {"backend": bc["engine"], "device": le.device, "hardware": bench.hardware(le.device),
                     "dtype": bc["dtype"], "cuda_graphs": engine.graphs,
                     "engine": bench.engine_summary(le.info, started, capture)}


def _served(ctx, bc: dict, ds: dict, prompts):
    started = "sglang-baseline" not in ctx.shared.started
    served = ctx.shared.get("sglang-baseline", lambda: bench.sglang_server(ctx, bc, "baseline", None))
    rows, wall = bench.serve_conversations(ctx, served, bc, prompts)
    records = []
    for r in rows:
        r.pop("completion")
        records.append({"dataset": ds["name"], **r})
    tokens = sum(r["n_tokens"] for r in records)
    return records, {"backend": "sglang", "device": "cuda", "hardware": bench.hardware("cuda", count=True),
                     "dtype": served.options["dtype"] or bc["dtype"], "concurrency": int(served.options["concurrency"]),
                     "sglang_version": sg.sglang_version(), "wall_s": wall,
                     "throughput_tok_s": tokens / wall if wall else None,
                     "engine": {**served.info, "started_here": started}}

