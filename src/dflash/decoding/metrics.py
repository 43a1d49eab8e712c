"""Benchmark metrics, computed from the raw per-request records only.

tau_macro: mean over requests of each request's mean accepted length (z-lab). tau_token: total accepted tokens over
total verification steps (SpecForge). Both include the bonus token; `tau_no_bonus` = tau_macro - 1.
Speedups, batch 1, ratios of mean time per output token (baseline over DFlash), with two clocks per request:
* z-lab's (`speedup_decode_zlab`, what the report shows): decode time from the end of the drafter's first pass over
  the prompt (`decode_s_zlab`; the baseline's from the end of its prefill) over all n output tokens;
* the project's own (`speedup_decode_only`): decode time from the end of the target's prefill (the first
  draft included) over n - 1 tokens (the first comes from prefill);
end-to-end (`speedup_e2e`) adds prefill to both, over n tokens. Records without `decode_s_zlab` (some of bench
format version 1; SGLang's, which have no per-step clock) give no z-lab value.
`diverged` counts the requests whose output differs from the baseline's at T=0 (their record locates the first
difference: `mismatch`).
SGLang records have no per-step data: they count with the server's mean (`spec_accept_length`, which also counts the
prefill token) over `spec_verify_ct` steps, and add nothing to the histogram or the per-position rates.
"""

from __future__ import annotations

import statistics


def _per_token(decode_s: float, n_tokens: int) -> float:
    return decode_s / max(1, n_tokens - 1)      # the first token comes from prefill


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (the shorter one's length if one is a prefix of the
    other); None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _server_steps(r: dict) -> int:
    """Verification steps of a record that has only a mean accepted length (SGLang)."""
    if r.get("spec_verify_ct"):
        return int(r["spec_verify_ct"])
    return max(1, round(r["n_tokens"] / r["spec_accept_length"]))


def summarize(records: list[dict], block_size: int) -> dict:
    if not records:
        raise ValueError("no benchmark records")
    steps = [r["accept_lengths"] for r in records if r["accept_lengths"]]
    # SGLang records carry only the server's per-request mean (`spec_accept_length`, over `spec_verify_ct` steps)
    served = [r for r in records if not r["accept_lengths"] and r.get("spec_accept_length")]
    means = [statistics.fmean(s) for s in steps] + [r["spec_accept_length"] for r in served]
    tau_macro = statistics.fmean(means) if means else 1.0
    step_count = sum(len(s) for s in steps)
    total_steps = step_count + sum(_server_steps(r) for r in served)
    accepted = sum(sum(s) for s in steps) + sum(r["n_tokens"] for r in served)
    tau_token = accepted / total_steps if total_steps else 1.0
    hist = [0] * (block_size + 1)
    for s in steps:
        for a in s:
            hist[min(a, block_size)] += 1
    # acceptance rate of draft position k (1..B-1): share of steps that accepted at least k drafted tokens
    per_pos = [sum(1 for s in steps for a in s if a - 1 >= k) / step_count if step_count else 0.0
               for k in range(1, block_size)]
    out = {"n_requests": len(records), "n_steps": total_steps, "tau_macro": tau_macro, "tau_token": tau_token,
           "tau_no_bonus": tau_macro - 1, "histogram": hist, "acceptance_per_position": per_pos,
           "tokens": sum(r["n_tokens"] for r in records)}
    if served:   # histogram and per-position rates then cover the per-step records only (none for SGLang)
        out["tau_source"] = "server-mean" if not steps else "mixed"
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
        if all("decode_s_zlab" in r and "decode_s_zlab" in r["baseline"] for r in records):
            d_z = statistics.fmean(r["decode_s_zlab"] / max(1, r["n_tokens"]) for r in records)
            b_z = statistics.fmean(r["baseline"]["decode_s_zlab"] / max(1, r["baseline"]["n_tokens"])
                                   for r in records)
            out.update({"speedup_decode_zlab": b_z / d_z if d_z else None, "tpot_dflash_zlab_ms": d_z * 1e3,
                        "tpot_baseline_zlab_ms": b_z * 1e3})
        if any("lossless" in r for r in records):
            out["diverged"] = sum(1 for r in records if r.get("lossless") is False)
    return out


def compare(a: list[dict], b: list[dict]) -> dict:
    """Two benches request by request (records matched on prompt id and turn; a later turn's prompt holds the
    earlier DFlash answers, so it is the same prompt only where those were equal): each request's tau on both sides
    and the first position where the DFlash outputs differ (None: equal; records without token ids: not compared)."""
    other = {(r["prompt_id"], r["turn"]): r for r in b}
    rows = []
    for r in a:
        o = other.get((r["prompt_id"], r["turn"]))
        if o is None:
            continue
        both = "tokens" in r and "tokens" in o
        rows.append({"prompt_id": r["prompt_id"], "turn": r["turn"],
                     "tau_a": statistics.fmean(r["accept_lengths"]) if r["accept_lengths"] else None,
                     "tau_b": statistics.fmean(o["accept_lengths"]) if o["accept_lengths"] else None,
                     "compared": both,
                     "first_difference": first_difference(r["tokens"], o["tokens"]) if both else None})
    keys_a = {(r["prompt_id"], r["turn"]) for r in a}
    return {"matched": len(rows), "only_a": len(keys_a) - len(rows), "only_b": len(other.keys() - keys_a),
            "equal_outputs": sum(1 for x in rows if x["compared"] and x["first_difference"] is None),
            "compared": sum(1 for x in rows if x["compared"]), "rows": rows}


def output_steps(accept_lengths: list[int], n_tokens: int) -> int:
    """Verify steps until the output (`n_tokens`, cut at the cap and the first EOS) is complete: the first k with
    1 + sum(accept_lengths[:k]) >= n_tokens (the prefill gives the first token). It leaves out the step z-lab's loop
    runs after the output is complete (exactly `max_new_tokens` committed, or a first token that is EOS), which a
    server stopping at the cap or EOS does not run, so it counts steps as SGLang's `spec_verify_ct` does."""
    done, k = 1, 0
    while done < n_tokens and k < len(accept_lengths):
        done += accept_lengths[k]
        k += 1
    return k


def verify_steps(r: dict) -> int | None:
    """Verify steps of a record: `verify_steps` (bench 2), else the per-step list's length or SGLang's count."""
    if r.get("verify_steps") is not None:
        return int(r["verify_steps"])
    if r.get("accept_lengths"):
        return len(r["accept_lengths"])
    return r.get("spec_verify_ct")


def tau_definitions(records: list[dict]) -> dict:
    """tau under two definitions that every engine's records give (completion tokens and verify steps), so that
    engines compare on one definition; means over requests:
    * `tau_tokens_per_step`: completion tokens / verify steps, SGLang's `spec_accept_length` (it counts the token
      the prefill produced, and the last step's tokens as far as the output goes);
    * `tau_new_per_step`: (completion tokens - 1) / verify steps, the prefill's token left out: the local engines'
      per-step mean (`tau_macro`) wherever their per-step accepted lengths add up to the output after its first
      token (they differ where a last step's accepted tokens run past the cap or an EOS).
    Records without verify steps (or with none) are left out; None when no record has them."""
    usable = [(r["n_tokens"], s) for r in records if (s := verify_steps(r))]
    if not usable:
        return {"tau_tokens_per_step": None, "tau_new_per_step": None}
    return {"tau_tokens_per_step": statistics.fmean(n / s for n, s in usable),
            "tau_new_per_step": statistics.fmean((n - 1) / s for n, s in usable)}
