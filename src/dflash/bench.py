"""bench: one dataset through the spec-decode engine (and the target-only baseline), as per-request records.

`records.jsonl` holds one line per (prompt, turn): dataset, prompt id, turn, accepted length per step, token counts,
prefill/decode times, the baseline's, and whether the output equals the baseline's (lossless check at T=0).
`summary.json` holds the metrics computed from those records, labelled with backend, hardware, temperature and n.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from dflash import chat, metrics, synthetic
from dflash.benchmarks import BenchPrompt, load_benchmark
from dflash.model import DFlashDrafter
from dflash.spec_decode import dflash_generate, target_generate
from dflash.target import load_target

SYNTHETIC_PREFIX = "synthetic_"


def load_prompts(ds: dict) -> tuple[list[BenchPrompt], dict]:
    """Prompts of a phase's dataset entry: `synthetic_<family>` sets or one of the ten benchmark datasets."""
    name = ds["name"]
    if name.startswith(SYNTHETIC_PREFIX):
        family = name.removeprefix(SYNTHETIC_PREFIX)
        n = ds.get("n", 16)
        pairs = synthetic.examples(family, n, synthetic.BENCH_SEED + ds.get("seed", 0))
        prompts = [BenchPrompt(id=f"{family}/{i}", turns=(q,)) for i, (q, _) in enumerate(pairs)]
        return prompts, {"dataset": name, "source": f"synthetic:{family}", "n": n, "seed": ds.get("seed", 0),
                         "ids": [p.id for p in prompts], "sha256": None}
    return load_benchmark(name, n=ds.get("n"), seed=ds.get("seed", 0), path=ds.get("path"))


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def run(cfg: dict, out: Path, upstream: dict[str, Path], log=print) -> dict:
    bc, ds = cfg["bench"], cfg["dataset"]
    if bc["engine"] != "hf":
        from dflash.sglang_engine import run_bench

        return run_bench(cfg, out, upstream, log)
    device = _device(bc["device"])
    dtype = getattr(torch, bc["dtype"])
    target, tokenizer = load_target(upstream["target"], device, dtype)
    drafter = DFlashDrafter.load(upstream["convert"], device, dtype)
    prompts, meta = load_prompts(ds)
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(target.generation_config, "eos_token_id", None)))
    bs = bc["block_size"] or drafter.config.block_size
    gen = torch.Generator(device=device).manual_seed(bc["seed"])
    warm = chat.prompt_ids(tokenizer, chat.messages([("user", prompts[0].turns[0])], bc["system_prompt"]),
                           bc["enable_thinking"])
    dflash_generate(target, drafter, warm, 8, eos, 0.0, bs)          # warm-up, not recorded
    target_generate(target, warm, 8, eos)
    records = []
    for p in prompts:
        history = []
        for turn, text in enumerate(p.turns):
            history.append(("user", text))
            ids = chat.prompt_ids(tokenizer, chat.messages(history, bc["system_prompt"]), bc["enable_thinking"])
            g = dflash_generate(target, drafter, ids, bc["max_new_tokens"], eos, bc["temperature"], bs, gen)
            rec = {"dataset": ds["name"], "prompt_id": p.id, "turn": turn, "prompt_tokens": len(ids),
                   "n_tokens": len(g.tokens), "accept_lengths": g.accept_lengths, "prefill_s": g.prefill_s,
                   "decode_s": g.decode_s}
            if bc["baseline"]:
                b = target_generate(target, ids, bc["max_new_tokens"], eos, bc["temperature"], gen)
                rec["baseline"] = {"n_tokens": len(b.tokens), "prefill_s": b.prefill_s, "decode_s": b.decode_s}
                if bc["temperature"] == 0:
                    rec["lossless"] = b.tokens == g.tokens
            records.append(rec)
            history.append(("assistant", tokenizer.decode(g.tokens, skip_special_tokens=True)))
    with open(out / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary = metrics.summarize(records, bs)
    summary.update({"dataset": ds["name"], "backend": "hf", "device": device,
                    "hardware": torch.cuda.get_device_name() if device == "cuda" else platform.machine() + " cpu",
                    "temperature": bc["temperature"], "block_size": bs, "prompt_ids": meta["ids"],
                    "source": meta["source"]})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lossless = summary.get("lossless")
    log(f"bench {ds['name']}: n={summary['n_requests']} tau {summary['tau_macro']:.3f} "
        f"(token-weighted {summary['tau_token']:.3f}) speedup {summary.get('speedup_decode_only')} "
        f"lossless {lossless}")
    if bc["temperature"] == 0 and bc["baseline"] and not lossless and dtype == torch.float32:
        # in fp32 a mismatch is a bug; in bf16 a batched verify may round differently, so it is only recorded
        bad = [r["prompt_id"] for r in records if not r.get("lossless", True)]
        raise AssertionError(f"bench {ds['name']}: spec-decode output differs from target greedy output for {bad}")
    inputs = {meta["source"]: meta["sha256"]} if meta.get("sha256") else {}
    return {"inputs": inputs, "summary": {k: v for k, v in summary.items() if k != "prompt_ids"}}


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
