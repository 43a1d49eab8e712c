"""train: the DFlash drafter trained on the target's hidden states, read top to bottom.

Per optimizer step: for each micro-batch, the frozen target computes the hidden states of `target_layer_ids`; anchors
are sampled (seeded by step, so a resumed run samples the same ones); the drafter predicts every block from the
context before its anchor; the decay-weighted loss is backpropagated. Checkpoints go to a work directory keyed by the
train stage key (never deleted by Snakemake); a rerun resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from dflash import objective, tokenization
from dflash.model import DFlashDrafter, DrafterConfig, target_features
from dflash.provenance import sha256_file
from dflash.schedule import lr_at, total_steps
from dflash.target import load_target, mask_token_id

METRICS = "metrics.jsonl"


class Batches:
    """Deterministic data order: epoch e visits the rows in a permutation seeded by (seed, e)."""

    def __init__(self, tokens: dict, seed: int):
        self.ids, self.mask, self.offsets = tokens["input_ids"].long(), tokens["loss_mask"], tokens["offsets"]
        self.n = len(self.offsets) - 1
        self.seed = seed
        self._perm: dict[int, torch.Tensor] = {}

    def row(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perm[epoch][i % self.n])

    def get(self, sample_indices: list[int], pad_id: int):
        rows = [self.row(i) for i in sample_indices]
        lens = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows]
        width = max(lens)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, (r, n) in enumerate(zip(rows, lens, strict=True)):
            a = int(self.offsets[r])
            ids[j, :n], mask[j, :n] = self.ids[a:a + n], self.mask[a:a + n]
        return ids, mask, torch.tensor(lens)


def _checkpoints(work: Path) -> list[Path]:
    return sorted(work.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(work: Path, step: int, state: dict, keep_last: int) -> None:
    final = work / f"step-{step:08d}"
    tmp = work / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    (tmp / "state.sha256").write_text(sha256_file(tmp / "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(work)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(work: Path, log=print) -> dict | None:
    """The newest checkpoint whose checksum verifies; corrupt or partial ones are reported and skipped."""
    for ckpt in reversed(_checkpoints(work)):
        digest = ckpt / "state.sha256"
        if not digest.is_file() or not (ckpt / "state.pt").is_file():
            log(f"train: checkpoint {ckpt} is partial (missing files), skipped")
            continue
        if sha256_file(ckpt / "state.pt") != digest.read_text().strip():
            log(f"train: checkpoint {ckpt} is corrupt (checksum mismatch), skipped")
            continue
        return torch.load(ckpt / "state.pt", weights_only=False)
    return None


def _attention(device: str, mode: str):
    use_flex = mode == "flex" or (mode == "auto" and device == "cuda")
    if not use_flex:
        return None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)

    def make(anchors, ctx_len, block_size):
        b, n = anchors.shape
        q_len = n * block_size
        bm = create_block_mask(objective.mask_mod_for(anchors, ctx_len, block_size), b, None, q_len, ctx_len + q_len,
                               device=device)
        return lambda q, k, v: compiled(q, k, v, block_mask=bm, enable_gqa=True)

    return make


def run(cfg: dict, out: Path, upstream: dict[str, Path], work: Path, log=print) -> dict:
    tc, dc = cfg["train"], cfg["drafter"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    target, tokenizer = load_target(upstream["target"], device, target_dtype)
    mcfg = DrafterConfig.for_target(target.config, dc, mask_token_id(tokenizer))
    drafter = DFlashDrafter(mcfg)
    drafter.init_weights(dc["init_seed"])
    drafter.to(device)
    data = Batches(tokenization.load(upstream["tokenize"]), tc["seed"])
    steps, global_batch = total_steps(data.n, tc)
    if tc["untrained"]:
        steps = 0
    opt = torch.optim.AdamW(drafter.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"], betas=(0.9, 0.95),
                            fused=device == "cuda")
    work.mkdir(parents=True, exist_ok=True)
    start, invalid = 0, 0
    state = latest_checkpoint(work, log)
    if state is not None:
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, invalid = state["step"], state["invalid_steps"]
        log(f"train: resumed from step {start}")
    metrics_path = work / METRICS
    _truncate_metrics(metrics_path, start)
    make_attend = _attention(device, tc["attention"])
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    bs, pad = mcfg.block_size, tokenizer.pad_token_id or 0
    log(f"train: {data.n} rows, {steps} steps (schedule length {steps}), global batch {global_batch}, "
        f"drafter {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M params, layers {mcfg.target_layer_ids}")
    t_start = time.time()
    drafter.train()
    with open(metrics_path, "a") as mf:
        for step in range(start, steps):
            t0 = time.time()
            lr = lr_at(step, steps, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            gen = torch.Generator().manual_seed(tc["seed"] * 1_000_003 + step)
            tot = {"loss": 0.0, "weight_sum": 0.0, "correct": 0, "counted": 0, "tokens": 0,
                   "per_k_correct": torch.zeros(bs), "per_k_counted": torch.zeros(bs)}
            for micro in range(tc["grad_accum"]):
                first = (step * tc["grad_accum"] + micro) * tc["micro_batch_size"]
                ids, lmask, lens = data.get(list(range(first, first + tc["micro_batch_size"])), pad)
                ids, lmask, lens = ids.to(device), lmask.to(device), lens.to(device)
                att = (torch.arange(ids.shape[1], device=device)[None] < lens[:, None]).long()
                with torch.no_grad():
                    feats = target_features(target, ids, mcfg.target_layer_ids, att).to(torch.float32)
                anchors, keep = objective.sample_anchors(lmask, tc["num_anchors"], bs, gen, lens)
                blocks = objective.build_blocks(ids, lmask, anchors, keep, bs, mcfg.mask_token_id, tc["gamma"])
                with torch.no_grad():
                    block_emb = embed(blocks.input_ids).to(torch.float32)
                s = ids.shape[1]
                positions = torch.cat([torch.arange(s, device=device).expand(ids.shape[0], s), blocks.positions], 1)
                attend = make_attend(anchors, s, bs) if make_attend else None
                mask = None if attend else objective.dense_mask(anchors, s, bs)
                hidden = drafter(block_emb, feats, positions, mask=mask, attend=attend)
                logits = lm_head(hidden.to(lm_head.weight.dtype))
                res = objective.block_loss(logits, blocks, bs)
                (res["loss"] / tc["grad_accum"]).backward()
                tot["loss"] += res["loss"].item() / tc["grad_accum"]
                for k in ("weight_sum", "correct", "counted"):
                    tot[k] += float(res[k])
                tot["per_k_correct"] += res["per_k_correct"].cpu()
                tot["per_k_counted"] += res["per_k_counted"].cpu()
                tot["tokens"] += int(lens.sum())
            if not math.isfinite(tot["loss"]):
                raise FloatingPointError(f"train: non-finite loss {tot['loss']} at step {step + 1}")
            if tot["weight_sum"] == 0:
                invalid += 1
                opt.zero_grad(set_to_none=True)
            else:
                gnorm = float(torch.nn.utils.clip_grad_norm_(drafter.parameters(), tc["grad_clip"]))
                opt.step()
                opt.zero_grad(set_to_none=True)
            dt = time.time() - t0
            done = step + 1
            if done % tc["log_every"] == 0 or done == steps:
                per_k = (tot["per_k_correct"] / tot["per_k_counted"].clamp(min=1)).tolist()
                rec = {"step": done, "loss": tot["loss"], "acc": tot["correct"] / max(1, tot["counted"]),
                       "acc_per_position": [round(a, 4) for a in per_k[1:]], "lr": lr,
                       "grad_norm": gnorm if tot["weight_sum"] else None, "samples_per_s": global_batch / dt,
                       "tokens_per_s": tot["tokens"] / dt, "invalid_steps": invalid,
                       "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                log(f"step {done}/{steps} loss {rec['loss']:.4f} acc {rec['acc']:.3f} lr {lr:.2e} "
                    f"{rec['samples_per_s']:.1f} samples/s")
            if done % tc["save_every"] == 0 or done == steps:
                save_checkpoint(work, done, {"model": drafter.state_dict(), "optim": opt.state_dict(), "step": done,
                                             "invalid_steps": invalid}, tc["keep_last"])
            if done >= 20 and invalid / done > tc["max_invalid_frac"]:
                raise RuntimeError(f"train: {invalid} of {done} steps had no valid anchor "
                                   f"(> max_invalid_frac {tc['max_invalid_frac']}); check tokenize.min_loss_tokens")
    wall = time.time() - t_start
    drafter.eval()
    torch.save(drafter.state_dict(), out / "drafter.pt")
    (out / "drafter_config.json").write_text(json.dumps(mcfg.to_hf("float32"), indent=1))
    shutil.copy(metrics_path, out / METRICS)
    last = _last_metrics(metrics_path)
    summary = {"steps": steps, "schedule_steps": steps, "global_batch": global_batch, "samples": steps * global_batch,
               "rows": data.n, "epochs": steps * global_batch / data.n, "resumed_from": start,
               "invalid_steps": invalid, "final_loss": last.get("loss"), "final_acc": last.get("acc"),
               "wall_s": wall, "device": device, "target_layer_ids": mcfg.target_layer_ids}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"summary": summary}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _last_metrics(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def load_drafter(train_dir: Path, device: str = "cpu") -> DFlashDrafter:
    cfg = DrafterConfig.from_hf(json.loads((Path(train_dir) / "drafter_config.json").read_text()))
    model = DFlashDrafter(cfg)
    model.load_state_dict(torch.load(Path(train_dir) / "drafter.pt", map_location="cpu"))
    return model.to(device).eval()
