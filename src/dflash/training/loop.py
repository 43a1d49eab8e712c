"""The training loop: the DFlash drafter trained on the target's hidden states, read top to bottom.

Per optimizer step and micro-batch: the frozen target (bf16 on GPU, no grad) computes the outputs of
`target_layer_ids`; anchors are sampled from a generator seeded by (seed, step, rank), so a resumed run samples the
same ones; the drafter predicts every block from the target context before its anchor; the decay-weighted loss
(LM head fused into the loss) is backpropagated, normalised as SpecForge does (see `accumulate_gradients`).
Gradients sync only on the last micro-step.

One process, or several under torchrun / Ray Train: the drafter is then sharded with FSDP2 (`fully_shard` per
decoder layer, bf16 compute, fp32 master weights and optimizer state). Checkpoints (torch DCP, sharded) go to a work
directory keyed by the train stage key, which Snakemake never deletes; a rerun resumes from the newest intact one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dflash.data.jsonl import read_jsonl, write_jsonl
from dflash.data.tokens import load_tokens
from dflash.modeling import objective
from dflash.modeling.drafter import TRAINED_CONFIG, TRAINED_WEIGHTS, DFlashDrafter, DrafterConfig, target_features
from dflash.modeling.schedule import lr_at, total_steps
from dflash.modeling.target import drafter_mask_id, load_target
from dflash.training.checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from dflash.training.distributed import all_sum, barrier, broadcast_path, init_distributed, shard
from dflash.training.tracker import Tracker

METRICS = "metrics.jsonl"
# AdamW's betas and eps. The paper (App. A.1) names AdamW without them and z-lab publishes no training code, so they
# follow SpecForge: its DFlash trainer's BF16Optimizer calls torch.optim.AdamW(params, lr=lr,
# weight_decay=weight_decay), i.e. PyTorch's defaults (specforge/optimizer.py); the seed PR's TorchSpec optimizer
# does the same. Recorded in the train summary.
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8,
         "source": "SpecForge specforge/optimizer.py (BF16Optimizer: torch.optim.AdamW defaults); the DFlash paper "
                   "and z-lab state none"}


class Batches:
    """Deterministic data order: epoch e visits the rows in a permutation seeded by (seed, e)."""

    def __init__(self, tokens: dict, seed: int):
        self.ids, self.mask, self.offsets = tokens["input_ids"].long(), tokens["loss_mask"], tokens["offsets"]
        self.n = len(self.offsets) - 1
        self.max_len = int((self.offsets[1:] - self.offsets[:-1]).max())
        self.seed = seed
        self._perm: dict[int, torch.Tensor] = {}

    def row(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perm[epoch][i % self.n])

    def get(self, sample_indices: list[int], pad_id: int, width: int | None = None):
        rows = [self.row(i) for i in sample_indices]
        lens = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows]
        width = width or max(lens)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, (r, n) in enumerate(zip(rows, lens, strict=True)):
            a = int(self.offsets[r])
            ids[j, :n], mask[j, :n] = self.ids[a:a + n], self.mask[a:a + n]
        return ids, mask, torch.tensor(lens)


def block_mask_factory(device: str, mode: str):
    """None for SDPA with a dense mask (CPU: FlexAttention has no CPU backward), else a function building the
    FlexAttention BlockMask of a batch from the same mask_mod. Query length (anchors x block) and key length (padded
    context + queries) are fixed, so the compiled attention never recompiles."""
    if mode == "sdpa" or (mode == "auto" and device != "cuda"):
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    def make(anchors, ctx_len, block_size):
        b, n = anchors.shape
        q_len = n * block_size
        return create_block_mask(objective.mask_mod_for(anchors, ctx_len, block_size), b, None, q_len,
                                 ctx_len + q_len, device=device, _compile=True)

    return make


def compile_layers(drafter: DFlashDrafter) -> None:
    """Compile each decoder layer (FlexAttention inside, norms and MLP fused), one graph per layer shape."""
    for layer in drafter.layers:
        layer.compile(dynamic=False)


def train_step_loss(target, drafter, mcfg, ids, lmask, lens, tc, gen, make_block_mask, embed, lm_weight) -> dict:
    """Forward one micro-batch and return the loss dict (see objective.fused_block_loss)."""
    device, bs = ids.device, mcfg.block_size
    # no padding: no mask, so the target's attention takes its plain causal (flash) path
    full = bool((lens == ids.shape[1]).all())
    att = None if full else (torch.arange(ids.shape[1], device=device)[None] < lens[:, None]).long()
    with torch.no_grad():
        feats = target_features(target, ids, mcfg.target_layer_ids, att)
    anchors, keep = objective.sample_anchors(lmask, tc["num_anchors"], gen)
    blocks = objective.build_blocks(ids, lmask, anchors, keep, bs, mcfg.mask_token_id, tc["gamma"])
    with torch.no_grad():
        block_emb = embed(blocks.input_ids)
    s = ids.shape[1]
    positions = torch.cat([torch.arange(s, device=device).expand(ids.shape[0], s), blocks.positions], 1)
    mask = make_block_mask(anchors, s, bs) if make_block_mask else objective.dense_mask(anchors, s, bs)
    dtype = next(iter(drafter.parameters())).dtype if device.type == "cpu" else torch.bfloat16
    with torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
        hidden = drafter(block_emb.to(dtype), feats.to(dtype), positions, mask=mask)
    return objective.fused_block_loss(hidden.to(lm_weight.dtype), lm_weight, blocks, bs, tc["loss_chunk"])


# Loss normalisation (`train.loss_normalisation`; omitted: the first). Every supervised block position weighs the
# same whatever micro-batch or rank it falls in (SpecForge), or every micro-batch weighs the same (the rule of
# train format versions 1 and 2, for ablations; with micro batch 1 every sample weighs the same however many
# positions it supervises).
DEFAULT_NORMALISATION = "global_weight_sum"
NORMALISATIONS = {
    "global_weight_sum": "SpecForge specforge/training/controller.py (TrainerCore.train_step backpropagates the sum "
                         "of weighted loss terms; _normalize_gradients scales gradients by world_size x "
                         "accumulation_steps / the all-reduced weight sum once per optimizer step)",
    "micro_batch_mean": "the weighted mean loss of each micro-batch, averaged over micro-batches and ranks",
}
# Slots of the per-step accumulator (float64, summed over micro-batches, then over ranks).
LOSS, WSUM, CORRECT, COUNTED, TOKENS, EMPTY, PER_K = range(7)


def accumulate_gradients(drafter, micro_loss, n_micro: int, normalisation: str, world: int, block_size: int):
    """One optimizer step's gradients in `drafter`'s .grad from `n_micro` micro-batches (`micro_loss(i)`: the loss
    dict of micro-batch i, see objective.fused_block_loss, plus `tokens`); returns the accumulator summed over ranks,
    with slot LOSS the step's loss under that normalisation.

    global_weight_sum: each micro-batch backpropagates its sum of weighted CE; once all have, the gradients (which
    FSDP averages over the `world` ranks) are scaled by world / the weight sum over all micro-batches and ranks, so
    they are the gradient of the pooled objective sum(w x CE) / sum(w). A step whose global weight sum is 0 keeps
    zero gradients (the caller skips it). micro_batch_mean: each backpropagates its weighted mean / n_micro."""
    acc = torch.zeros(PER_K + 2 * block_size, dtype=torch.float64)
    for micro in range(n_micro):
        if hasattr(drafter, "set_requires_gradient_sync"):
            drafter.set_requires_gradient_sync(micro == n_micro - 1)
        res = micro_loss(micro)
        if normalisation == "micro_batch_mean":
            (res["loss"] / n_micro).backward()
            acc[LOSS] += res["loss"].item() / n_micro / world
        else:
            res["loss_sum"].backward()
            acc[LOSS] += res["loss_sum"].item()
        acc[WSUM:EMPTY + 1] += torch.tensor([float(res["weight_sum"]), float(res["correct"]), float(res["counted"]),
                                             float(res["tokens"]), float(res["weight_sum"] == 0)],
                                            dtype=torch.float64)
        acc[PER_K:PER_K + block_size] += res["per_k_correct"].cpu().double()
        acc[PER_K + block_size:] += res["per_k_counted"].cpu().double()
    device = next(iter(drafter.parameters())).device
    acc = all_sum(acc.to(device), world).cpu()
    if normalisation != "micro_batch_mean":
        total = acc[WSUM].item()
        acc[LOSS] = acc[LOSS] / total if total > 0 else 0.0
        if total > 0:
            scale = world / total
            for p in drafter.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
    return acc


@dataclass
class Training:
    """What the step loop works on, from `setup`: the models, the data, the optimizer and the step counts (`start`:
    the step a resumed run goes on from; `invalid`, `empty`: the steps without a valid anchor and the empty
    micro-batches so far)."""

    tc: dict
    rank: int
    world: int
    device_name: str
    device: torch.device
    target: torch.nn.Module
    tokenizer: object
    mcfg: DrafterConfig
    drafter: DFlashDrafter
    data: Batches
    planned: int
    steps: int
    global_batch: int
    opt: torch.optim.Optimizer
    start: int
    invalid: int
    empty: int
    metrics_path: Path
    make_block_mask: object
    embed: torch.nn.Module
    lm_weight: torch.Tensor
    pad: int
    width: int | None
    normalisation: str


def train(cfg: dict, out: Path, upstream: dict[str, Path], work: Path, log=print, tracking: dict | None = None) -> dict:
    """Train the drafter of `cfg` into `out`; `log` prints a line, `tracking` is the run's `logging` section (wandb,
    progress; see `dflash.training.tracker.Tracker`)."""
    t = setup(cfg, upstream, work, log)
    tc = t.tc
    tracker = Tracker(t.metrics_path, tracking or {}, cfg, t.steps, t.start, t.rank, log)
    t_start = time.time()
    t.drafter.train()
    for step in range(t.start, t.steps):
        rec = optimizer_step(t, step)
        tracker.step(rec)
        done = step + 1
        if done % tc["save_every"] == 0 or done == t.steps:
            save_checkpoint(work, done, t.drafter, t.opt, {"invalid_steps": t.invalid, "empty_micro_batches": t.empty},
                            tc["keep_last"], t.rank, t.world)
        if done >= 20 and t.invalid / done > tc["max_invalid_frac"]:
            raise RuntimeError(f"train: {t.invalid} of {done} steps had no valid anchor "
                               f"(> max_invalid_frac {tc['max_invalid_frac']}); check tokenize.min_loss_tokens")
    tracker.close()
    return {"summary": finish(t, out, tracker, time.time() - t_start)}


def setup(cfg: dict, upstream: dict[str, Path], work: Path, log) -> Training:
    """Ranks, target, drafter (sharded), data, schedule length and optimizer; the newest valid checkpoint restored
    and the metrics past it dropped."""
    tc, dc = cfg["train"], cfg["drafter"]
    rank, world, device_name = init_distributed()
    device = torch.device(device_name, torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    target, tokenizer = load_target(upstream["target"], device, torch.bfloat16 if device_name == "cuda"
                                    else torch.float32)
    mcfg = DrafterConfig.for_target(target.config, dc, drafter_mask_id(tokenizer, dc))
    drafter = DFlashDrafter(mcfg)
    drafter.init_weights(dc["init_seed"])
    drafter.to(device)
    shard(drafter, device_name, world)
    data = Batches(load_tokens(upstream["tokenize"]), tc["seed"])
    planned = cfg.get("data_parallel", 1)
    if world != planned:
        log(f"train: WARNING {world} ranks but the phase's layout plans {planned}: the global batch and schedule "
            f"differ from the plan (resources.train)")
    steps, global_batch = total_steps(data.n, tc, world)
    if tc["untrained"]:
        steps = 0
    opt = torch.optim.AdamW(drafter.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"],
                            betas=ADAMW["betas"], eps=ADAMW["eps"], fused=device_name == "cuda")
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    barrier(world)
    start, invalid, empty = 0, 0, 0
    ckpt = broadcast_path(find_checkpoint(work, log) if rank == 0 else None, rank, world)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, drafter, opt)
        start, invalid, empty = meta["step"], meta["invalid_steps"], meta.get("empty_micro_batches", 0)
        log(f"train: resumed from step {start} ({ckpt.name})")
    metrics_path = work / METRICS
    if rank == 0:
        _truncate_metrics(metrics_path, start)
    make_block_mask = block_mask_factory(device_name, tc["attention"])
    if make_block_mask is not None:
        compile_layers(drafter)
    embed, lm_weight = target.get_input_embeddings(), target.get_output_embeddings().weight
    pad = tokenizer.pad_token_id or 0
    width = data.max_len if tc["pad_to"] == "dataset" else None
    log(f"train: {data.n} rows, {steps} steps (schedule length {steps}), global batch {global_batch} "
        f"= {tc['micro_batch_size']} x {tc['grad_accum']} accum x {world} ranks, drafter "
        f"{sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M params, target layers {mcfg.target_layer_ids}")
    return Training(tc, rank, world, device_name, device, target, tokenizer, mcfg, drafter, data, planned, steps,
                    global_batch, opt, start, invalid, empty, metrics_path, make_block_mask, embed, lm_weight, pad,
                    width, tc.get("loss_normalisation", DEFAULT_NORMALISATION))


def optimizer_step(t: Training, step: int) -> dict | None:
    """One optimizer step (0-based `step`): its learning rate, the gradients of its micro-batches, the update
    (skipped, and counted in `t.invalid`, where no micro-batch of any rank had a valid anchor); the metrics record
    on logging steps, else None."""
    tc, bs, per_rank = t.tc, t.mcfg.block_size, t.tc["micro_batch_size"]
    t0 = time.time()
    lr = lr_at(step, t.steps, tc)
    for g in t.opt.param_groups:
        g["lr"] = lr
    gen = torch.Generator().manual_seed((tc["seed"] * 1_000_003 + step) * 1009 + t.rank)

    def micro_loss(micro: int) -> dict:
        first = ((step * tc["grad_accum"] + micro) * t.world + t.rank) * per_rank
        ids, lmask, lens = (x.to(t.device) for x in t.data.get(list(range(first, first + per_rank)), t.pad, t.width))
        res = train_step_loss(t.target, t.drafter, t.mcfg, ids, lmask, lens, tc, gen, t.make_block_mask, t.embed,
                              t.lm_weight)
        return {**res, "tokens": lens.sum()}

    acc = accumulate_gradients(t.drafter, micro_loss, tc["grad_accum"], t.normalisation, t.world, bs)
    loss = acc[LOSS].item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"train: non-finite loss {loss} at step {step + 1}")
    t.empty += int(acc[EMPTY])
    gnorm = None
    if acc[WSUM] == 0:
        t.invalid += 1
        t.opt.zero_grad(set_to_none=True)
    else:
        gnorm = float(torch.nn.utils.clip_grad_norm_(t.drafter.parameters(), tc["grad_clip"]))
        t.opt.step()
        t.opt.zero_grad(set_to_none=True)
    if t.device_name == "cuda":
        torch.cuda.synchronize()
    dt, done = time.time() - t0, step + 1
    if not (done % tc["log_every"] == 0 or done == t.steps):
        return None
    per_k = (acc[PER_K:PER_K + bs] / acc[PER_K + bs:].clamp(min=1)).tolist()
    return {"step": done, "loss": loss, "acc": acc[CORRECT].item() / max(1.0, acc[COUNTED].item()),
            "acc_per_position": [round(a, 4) for a in per_k[1:]], "lr": lr, "grad_norm": gnorm,
            "samples_per_s": t.global_batch / dt, "tokens_per_s": acc[TOKENS].item() / dt, "step_s": dt,
            "invalid_steps": t.invalid, "empty_micro_batches": t.empty,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if t.device_name == "cuda" else None}


def finish(t: Training, out: Path, tracker: Tracker, wall: float) -> dict:
    """The trained drafter, its config, the metrics and the summary into `out` (rank 0; every rank gathers the full
    state dict); returns the summary (empty on other ranks)."""
    full = _full_state_dict(t.drafter, t.world)
    summary = {}
    if t.rank == 0:
        torch.save(full, out / TRAINED_WEIGHTS)
        (out / TRAINED_CONFIG).write_text(json.dumps(t.mcfg.to_hf("float32"), indent=1))
        shutil.copy(t.metrics_path, out / METRICS)
        last = _last_metrics(t.metrics_path)
        steps, global_batch, n = t.steps, t.global_batch, t.data.n
        summary = {"steps": steps, "schedule_steps": steps, "global_batch": global_batch,
                   "samples": steps * global_batch, "rows": n, "epochs": steps * global_batch / n,
                   "resumed_from": t.start, "invalid_steps": t.invalid, "empty_micro_batches": t.empty,
                   "loss_normalisation": {"mode": t.normalisation, "source": NORMALISATIONS[t.normalisation]},
                   "final_loss": last.get("loss"),
                   "final_acc": last.get("acc"), "wall_s": wall, "device": t.device_name, "world_size": t.world,
                   "planned_data_parallel": t.planned,
                   "gpu_name": torch.cuda.get_device_name() if t.device_name == "cuda" else None,
                   "target_layer_ids": t.mcfg.target_layer_ids, "mask_token_id": t.mcfg.mask_token_id,
                   "optimizer": {"name": "AdamW", **ADAMW, "betas": list(ADAMW["betas"])}}
        if tracker.run_dir:                       # wandb's run directory, relative to the repository root
            summary["wandb_run_dir"] = os.path.relpath(tracker.run_dir)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    barrier(t.world)
    return summary


def _full_state_dict(drafter, world: int) -> dict:
    if not hasattr(drafter, "set_requires_gradient_sync"):      # not sharded
        return {k: v.detach().cpu() for k, v in drafter.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(drafter, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    write_jsonl(path, [rec for rec in read_jsonl(path) if rec["step"] <= step])


def _last_metrics(path: Path) -> dict:
    records = read_jsonl(path) if path.is_file() else []
    return records[-1] if records else {}
