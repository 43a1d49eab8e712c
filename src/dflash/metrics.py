"""Benchmark metrics, computed from the raw per-request records only.

tau_macro: mean over requests of each request's mean accepted length (z-lab). tau_token: total accepted tokens over
total verification steps (SpecForge). Both include the bonus token; `tau_no_bonus` = tau_macro - 1.
Speedups: decode-only = mean baseline time per token / mean DFlash time per token (prefill excluded, z-lab);
end-to-end adds prefill to both.
"""

from __future__ import annotations

import statistics


def _per_token(decode_s: float, n_tokens: int) -> float:
    return decode_s / max(1, n_tokens - 1)      # the first token comes from prefill


def summarize(records: list[dict], block_size: int) -> dict:
    if not records:
        raise ValueError("no benchmark records")
    steps = [r["accept_lengths"] for r in records if r["accept_lengths"]]
    tau_macro = statistics.fmean(statistics.fmean(s) for s in steps) if steps else 1.0
    total_steps = sum(len(s) for s in steps)
    tau_token = sum(sum(s) for s in steps) / total_steps if total_steps else 1.0
    hist = [0] * (block_size + 1)
    for s in steps:
        for a in s:
            hist[min(a, block_size)] += 1
    # acceptance rate of draft position k (1..B-1): share of steps that accepted at least k drafted tokens
    per_pos = [sum(1 for s in steps for a in s if a - 1 >= k) / total_steps if total_steps else 0.0
               for k in range(1, block_size)]
    out = {"n_requests": len(records), "n_steps": total_steps, "tau_macro": tau_macro, "tau_token": tau_token,
           "tau_no_bonus": tau_macro - 1, "histogram": hist, "acceptance_per_position": per_pos,
           "tokens": sum(r["n_tokens"] for r in records)}
    base = [r for r in records if r.get("baseline")]
    if base and len(base) == len(records):
        d_tpot = statistics.fmean(_per_token(r["decode_s"], r["n_tokens"]) for r in records)
        b_tpot = statistics.fmean(_per_token(r["baseline"]["decode_s"], r["baseline"]["n_tokens"]) for r in records)
        d_e2e = statistics.fmean((r["prefill_s"] + r["decode_s"]) / r["n_tokens"] for r in records)
        b_e2e = statistics.fmean((r["baseline"]["prefill_s"] + r["baseline"]["decode_s"]) / r["baseline"]["n_tokens"]
                                 for r in records)
        out.update({"speedup_decode_only": b_tpot / d_tpot if d_tpot else None,
                    "speedup_e2e": b_e2e / d_e2e if d_e2e else None,
                    "tpot_dflash_ms": d_tpot * 1e3, "tpot_baseline_ms": b_tpot * 1e3,
                    "lossless": all(r.get("lossless", True) for r in records)})
    return out
