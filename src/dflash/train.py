"""train: the DFlash drafter trained on the target's hidden states, read top to bottom.

Per optimizer step and micro-batch: the frozen target (bf16 on GPU, no grad) computes the outputs of
`target_layer_ids`; anchors are sampled from a generator seeded by (seed, step, rank), so a resumed run samples the
same ones; the drafter predicts every block from the target context before its anchor; the decay-weighted loss
(LM head fused into the loss) is backpropagated. Gradients sync only on the last micro-step.

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
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from dflash import objective, tokenization
from dflash.model import DFlashDrafter, DrafterConfig, target_features
from dflash.provenance import output_checksums
from dflash.schedule import lr_at, total_steps
from dflash.target import load_target, mask_token_id

METRICS = "metrics.jsonl"


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


# ---- distributed setup ----------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int, str]:
    """(rank, world size, device); starts the process group when launched by torchrun or Ray Train."""
    if dist.is_initialized():                      # Ray Train starts the process group itself
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, "cuda" if cuda else "cpu"


def shard(drafter: DFlashDrafter, device: str, world: int) -> None:
    """FSDP2 with one unit per decoder layer; bf16 compute on GPU, fp32 master weights and reductions.

    On GPU this applies to a single rank too: the bf16 copy of each layer then exists only while it runs."""
    if world == 1 and device != "cuda":
        return
    if not dist.is_initialized():                  # one GPU: a single-rank group in memory, for the device mesh
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device, (world,))
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in drafter.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(drafter, mesh=mesh, mp_policy=policy)


def _all_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
    return values


# ---- checkpoints ----------------------------------------------------------------------------------------------

def _checkpoints(work: Path) -> list[Path]:
    return sorted(work.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(work: Path, step: int, drafter, opt, meta: dict, keep_last: int, rank: int, world: int) -> None:
    """DCP-sharded model + optimizer into a temporary directory, checksums in meta.json, then rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final = work / f".tmp-step-{step:08d}", work / f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    model_sd, optim_sd = get_state_dict(drafter, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier(world)
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world,
                                                   "files": output_checksums(tmp)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(work)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def find_checkpoint(work: Path, log=print) -> Path | None:
    """The newest checkpoint whose files match the checksums in its meta.json; others are reported and skipped."""
    for ckpt in reversed(_checkpoints(work)):
        meta_file = ckpt / "meta.json"
        if not meta_file.is_file():
            log(f"train: checkpoint {ckpt} is partial (no meta.json), skipped")
            continue
        files = json.loads(meta_file.read_text())["files"]
        actual = {k: v for k, v in output_checksums(ckpt).items() if k != "meta.json"}
        if actual != files:
            bad = sorted(k for k in set(files) | set(actual) if files.get(k) != actual.get(k))
            log(f"train: checkpoint {ckpt} is corrupt (checksum mismatch in {', '.join(bad)}), skipped")
            continue
        return ckpt
    return None


def load_checkpoint(ckpt: Path, drafter, opt) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(drafter, opt)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(drafter, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((ckpt / "meta.json").read_text())


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _broadcast_path(path: Path | None, rank: int, world: int) -> Path | None:
    if world == 1:
        return path
    box = [str(path) if path else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


# ---- observability --------------------------------------------------------------------------------------------

class Tracker:
    """metrics.jsonl (rank 0), a progress bar, and wandb when enabled (project and run named by phase and run)."""

    def __init__(self, path: Path, logging: dict, config: dict, steps: int, start: int, rank: int, log):
        self.rank, self.log = rank, log
        self.file = open(path, "a") if rank == 0 else None
        self.bar = self.wandb = None
        if rank == 0 and logging.get("progress", True):
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, unit="step", mininterval=5.0, dynamic_ncols=True)
        if rank == 0 and logging.get("wandb", "off") != "off":
            try:
                import wandb
            except ImportError:
                raise ImportError("logging.wandb is set but wandb is missing: pip install -e '.[wandb]'") from None
            phase, run = logging.get("phase", "dflash"), logging.get("run", "run")
            self.wandb = wandb.init(project=logging.get("wandb_project") or f"dflash-{phase}", name=f"{phase}/{run}",
                                    mode=logging["wandb"], config=config, resume="allow")

    def step(self, rec: dict | None) -> None:
        if self.rank != 0:
            return
        if self.bar:
            self.bar.update(1)
        if rec is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.bar:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}")
        if self.wandb:
            self.wandb.log({k: v for k, v in rec.items() if k != "acc_per_position"}, step=rec["step"])
        self.log(f"step {rec['step']} loss {rec['loss']:.4f} acc {rec['acc']:.3f} lr {rec['lr']:.2e} "
                 f"{rec['samples_per_s']:.1f} samples/s")

    def close(self) -> None:
        for x in (self.bar, self.file):
            if x:
                x.close()
        if self.wandb:
            self.wandb.finish()


# ---- the training loop ----------------------------------------------------------------------------------------

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
    att = (torch.arange(ids.shape[1], device=device)[None] < lens[:, None]).long()
    with torch.no_grad():
        feats = target_features(target, ids, mcfg.target_layer_ids, att)
    anchors, keep = objective.sample_anchors(lmask, tc["num_anchors"], bs, gen, lens)
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


def run(cfg: dict, out: Path, upstream: dict[str, Path], work: Path, log=print, logging: dict | None = None) -> dict:
    if os.environ.get("DFLASH_LAUNCHER") == "ray" and "RANK" not in os.environ:
        from dflash.ray_launch import run_with_ray_train

        return run_with_ray_train(cfg, out, upstream, work, logging or {})
    return train(cfg, out, upstream, work, log, logging or {})


def train(cfg: dict, out: Path, upstream: dict[str, Path], work: Path, log=print, logging: dict | None = None) -> dict:
    tc, dc = cfg["train"], cfg["drafter"]
    rank, world, device_name = init_distributed()
    device = torch.device(device_name, torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    target, tokenizer = load_target(upstream["target"], device, torch.bfloat16 if device_name == "cuda"
                                    else torch.float32)
    mcfg = DrafterConfig.for_target(target.config, dc, mask_token_id(tokenizer, dc.get("mask_token")))
    drafter = DFlashDrafter(mcfg)
    drafter.init_weights(dc["init_seed"])
    drafter.to(device)
    shard(drafter, device_name, world)
    data = Batches(tokenization.load(upstream["tokenize"]), tc["seed"])
    planned = cfg.get("data_parallel", 1)
    if world != planned:
        log(f"train: WARNING {world} ranks but the phase's layout plans {planned}: the global batch and schedule "
            f"differ from the plan (resources.train)")
    steps, global_batch = total_steps(data.n, tc, world)
    if tc["untrained"]:
        steps = 0
    opt = torch.optim.AdamW(drafter.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"], betas=(0.9, 0.95),
                            fused=device_name == "cuda")
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    _barrier(world)
    start, invalid = 0, 0
    ckpt = _broadcast_path(find_checkpoint(work, log) if rank == 0 else None, rank, world)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, drafter, opt)
        start, invalid = meta["step"], meta["invalid_steps"]
        log(f"train: resumed from step {start} ({ckpt.name})")
    metrics_path = work / METRICS
    if rank == 0:
        _truncate_metrics(metrics_path, start)
    make_block_mask = block_mask_factory(device_name, tc["attention"])
    if make_block_mask is not None:
        compile_layers(drafter)
    embed, lm_weight = target.get_input_embeddings(), target.get_output_embeddings().weight
    bs, pad = mcfg.block_size, tokenizer.pad_token_id or 0
    width = data.max_len if tc["pad_to"] == "dataset" else None
    log(f"train: {data.n} rows, {steps} steps (schedule length {steps}), global batch {global_batch} "
        f"= {tc['micro_batch_size']} x {tc['grad_accum']} accum x {world} ranks, drafter "
        f"{sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M params, target layers {mcfg.target_layer_ids}")
    tracker = Tracker(metrics_path, logging or {}, cfg, steps, start, rank, log)
    t_start = time.time()
    drafter.train()
    per_rank = tc["micro_batch_size"]
    for step in range(start, steps):
        t0 = time.time()
        lr = lr_at(step, steps, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed((tc["seed"] * 1_000_003 + step) * 1009 + rank)
        acc = torch.zeros(5 + 2 * bs, dtype=torch.float64)   # loss, wsum, correct, counted, tokens, per-k (2 x bs)
        for micro in range(tc["grad_accum"]):
            first = ((step * tc["grad_accum"] + micro) * world + rank) * per_rank
            ids, lmask, lens = (t.to(device) for t in data.get(list(range(first, first + per_rank)), pad, width))
            if hasattr(drafter, "set_requires_gradient_sync"):
                drafter.set_requires_gradient_sync(micro == tc["grad_accum"] - 1)
            res = train_step_loss(target, drafter, mcfg, ids, lmask, lens, tc, gen, make_block_mask, embed,
                                  lm_weight)
            (res["loss"] / tc["grad_accum"]).backward()
            acc[0] += res["loss"].item() / tc["grad_accum"]
            acc[1:5] += torch.tensor([float(res["weight_sum"]), float(res["correct"]), float(res["counted"]),
                                      float(lens.sum())], dtype=torch.float64)
            acc[5:5 + bs] += res["per_k_correct"].cpu().double()
            acc[5 + bs:] += res["per_k_counted"].cpu().double()
        acc = _all_sum(acc.to(device), world).cpu()
        loss = acc[0].item() / world
        if not math.isfinite(loss):
            raise FloatingPointError(f"train: non-finite loss {loss} at step {step + 1}")
        gnorm = None
        if acc[1] == 0:
            invalid += 1
            opt.zero_grad(set_to_none=True)
        else:
            gnorm = float(torch.nn.utils.clip_grad_norm_(drafter.parameters(), tc["grad_clip"]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device_name == "cuda":
            torch.cuda.synchronize()
        dt, done = time.time() - t0, step + 1
        rec = None
        if done % tc["log_every"] == 0 or done == steps:
            per_k = (acc[5:5 + bs] / acc[5 + bs:].clamp(min=1)).tolist()
            rec = {"step": done, "loss": loss, "acc": acc[2].item() / max(1.0, acc[3].item()),
                   "acc_per_position": [round(a, 4) for a in per_k[1:]], "lr": lr, "grad_norm": gnorm,
                   "samples_per_s": global_batch / dt, "tokens_per_s": acc[4].item() / dt, "step_s": dt,
                   "invalid_steps": invalid,
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device_name == "cuda" else None}
        tracker.step(rec)
        if done % tc["save_every"] == 0 or done == steps:
            save_checkpoint(work, done, drafter, opt, {"invalid_steps": invalid}, tc["keep_last"], rank, world)
        if done >= 20 and invalid / done > tc["max_invalid_frac"]:
            raise RuntimeError(f"train: {invalid} of {done} steps had no valid anchor "
                               f"(> max_invalid_frac {tc['max_invalid_frac']}); check tokenize.min_loss_tokens")
    tracker.close()
    wall = time.time() - t_start
    full = _full_state_dict(drafter, world)
    summary = {}
    if rank == 0:
        torch.save(full, out / "drafter.pt")
        (out / "drafter_config.json").write_text(json.dumps(mcfg.to_hf("float32"), indent=1))
        shutil.copy(metrics_path, out / METRICS)
        last = _last_metrics(metrics_path)
        summary = {"steps": steps, "schedule_steps": steps, "global_batch": global_batch,
                   "samples": steps * global_batch, "rows": data.n, "epochs": steps * global_batch / data.n,
                   "resumed_from": start, "invalid_steps": invalid, "final_loss": last.get("loss"),
                   "final_acc": last.get("acc"), "wall_s": wall, "device": device_name, "world_size": world,
                   "planned_data_parallel": planned,
                   "gpu_name": torch.cuda.get_device_name() if device_name == "cuda" else None,
                   "target_layer_ids": mcfg.target_layer_ids}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _barrier(world)
    return {"summary": summary}


def _full_state_dict(drafter, world: int) -> dict:
    if not hasattr(drafter, "set_requires_gradient_sync"):      # not sharded
        return {k: v.detach().cpu() for k, v in drafter.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(drafter, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
