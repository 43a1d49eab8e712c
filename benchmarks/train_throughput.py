"""Training-step throughput of the DFlash drafter at Qwen3-8B scale (random weights, random target features).

One step = anchors + blocks, drafter forward (FlexAttention on GPU), LM head + loss, backward, grad clip, AdamW.
Shapes: 5 drafter layers, hidden 4096, intermediate 12288, 32/8 heads, vocab 151,936, block 16, 512 anchors, batch 1.

    python benchmarks/train_throughput.py --seq 2048 3072            # one GPU: optimised path vs a baseline path
    torchrun --nproc_per_node 4 benchmarks/train_throughput.py --seq 2048 --fsdp   # FSDP2 scaling
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --seq 2048 --with-target   # end to end, 2 GPUs

`--with-target` times what the train stage does per step, through its own function (`train_step_loss`): the frozen
target's forward (a randomly initialised Qwen3-8B-shaped Qwen3ForCausalLM in bf16, built on the device with the 34
layers the deepest feature layer needs), feature gathering, anchors and blocks, the drafter forward and fused loss,
backward, clip, AdamW; FSDP2 and compiled layers as the trainer uses them. It also times the target forward alone to
report its share of the step.

The baseline path, run in the same process, keeps fp32 weights under autocast, materialises the full-vocab logits
(plain cross entropy) and uses the default (foreach) AdamW; the optimised path shards the drafter with FSDP2 (bf16
compute, fp32 master; on one GPU too), fuses the LM head into the loss (chunked, compiled) and uses fused AdamW.
Both use FlexAttention with a compiled block mask. Prints one JSON line per
configuration: ms/step, samples/s, tokens/s, peak memory, MFU, FlexAttention recompiles after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from dflash.modeling import objective
from dflash.modeling.drafter import DFlashDrafter, DrafterConfig, target_features
from dflash.training.distributed import shard
from dflash.training.loop import block_mask_factory, compile_layers, train_step_loss

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=5, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, num_target_layers=36,
                target_layer_ids=[1, 9, 17, 25, 33], mask_token_id=151669, block_size=16, rope_theta=1e6)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0}   # dense bf16


def step_flops(c: DrafterConfig, seq: int, q_len: int) -> float:
    """Training FLOPs of one step: drafter (x3), frozen LM head (forward + input grad = x2), attention (x3,
    counted dense over the keys a query may see: its anchor's context, ~seq/2 on average, plus its block)."""
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_layer = 2 * q_len * (h * h * 2 + 3 * h * i) + 2 * (seq + q_len) * 2 * h * kv
    fc = 2 * seq * len(c.target_layer_ids) * h * h
    attn = 2 * 2 * q_len * (seq / 2 + c.block_size) * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    lm_head = 2 * q_len * h * c.vocab_size
    return 3 * (c.num_hidden_layers * per_layer + fc + attn) + 2 * lm_head


def run_config(seq: int, anchors: int, fused: bool, steps: int, warmup: int, world: int, rank: int,
               loss_chunk: int = 2048, compile_mode: bool = False) -> dict:
    dev = torch.device("cuda", torch.cuda.current_device())
    c = DrafterConfig(**QWEN3_8B)
    torch.manual_seed(0)
    drafter = DFlashDrafter(c).to(dev)
    drafter.init_weights(0)
    if fused:
        shard(drafter, "cuda", world)          # FSDP2 units per layer: bf16 compute, fp32 master (1 rank too)
    lm_weight = (torch.randn(c.vocab_size, c.hidden_size, device=dev, dtype=torch.bfloat16) * 0.02)
    embed = torch.nn.Embedding.from_pretrained(lm_weight.clone(), freeze=True)
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused, foreach=not fused)
    make_block_mask = block_mask_factory("cuda", "flex")
    if compile_mode:
        compile_layers(drafter)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, c.vocab_size - 100, (1, seq), generator=gen).to(dev)
    lmask = torch.zeros(1, seq, dtype=torch.bool, device=dev)
    lmask[:, seq // 8:] = True                                    # prompt then response
    feats = torch.randn(1, seq, 5 * c.hidden_size, device=dev, dtype=torch.bfloat16)
    from torch._dynamo.utils import counters

    times, parts = [], {k: 0.0 for k in ("prep", "forward", "loss", "backward", "optimizer")}
    for it in range(warmup + steps):
        if it == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            graphs_after_warmup = counters["stats"]["unique_graphs"]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        t0 = time.perf_counter()
        ev[0].record()
        a, keep = objective.sample_anchors(lmask, anchors, gen)
        blocks = objective.build_blocks(ids, lmask, a, keep, c.block_size, c.mask_token_id, 7.0)
        block_emb = embed(blocks.input_ids)
        positions = torch.cat([torch.arange(seq, device=dev)[None], blocks.positions], 1)
        block_mask = make_block_mask(a, seq, c.block_size)
        ev[1].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = drafter(block_emb, feats, positions, mask=block_mask)
        ev[2].record()
        if fused:
            res = objective.fused_block_loss(hidden.to(torch.bfloat16), lm_weight, blocks, c.block_size, loss_chunk)
        else:
            res = objective.block_loss(hidden.to(torch.bfloat16) @ lm_weight.T, blocks, c.block_size)
        ev[3].record()
        res["loss"].backward()
        ev[4].record()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev[5].record()
        torch.cuda.synchronize()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            for i, k in enumerate(parts):
                parts[k] += ev[i].elapsed_time(ev[i + 1]) / steps
    if world > 1:
        t = torch.tensor([sum(times) / len(times)], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step_s = t.item()
    else:
        step_s = sum(times) / len(times)
    q_len = anchors * c.block_size
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    flops = step_flops(c, seq, q_len)
    out = {"gpu": gpu, "world_size": world, "seq": seq, "anchors": anchors,
           "path": "optimised" if fused else "baseline",
           "ms_per_step": round(step_s * 1e3, 1), "samples_per_s": round(world / step_s, 2),
           "tokens_per_s": round(world * seq / step_s), "block_tokens_per_s": round(world * q_len / step_s),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "mfu": round(flops / step_s / (peak * 1e12), 3) if peak else None,
           "recompiles_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
           "ms_breakdown": {k: round(v, 1) for k, v in parts.items()}, "loss_chunk": loss_chunk if fused else None,
           "compiled_layers": compile_mode,
           "torch": torch.__version__}
    del drafter, opt, lm_weight, embed, feats
    torch.cuda.empty_cache()
    return out


TARGET_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=34,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 tie_word_embeddings=False, rms_norm_eps=1e-6)


def build_target(dev: torch.device):
    """Qwen3-8B's shapes with random weights, bf16, built on the device: layers 0..33 (the deepest feature layer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**TARGET_8B, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def run_end_to_end(seq: int, anchors: int, steps: int, warmup: int, world: int, rank: int, loss_chunk: int,
                   compile_mode: bool, target) -> dict:
    """One train-stage step as the trainer takes it, target forward included (see the module docstring)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    c = DrafterConfig(**QWEN3_8B)
    torch.manual_seed(0)
    drafter = DFlashDrafter(c).to(dev)
    drafter.init_weights(0)
    shard(drafter, "cuda", world)
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    make_block_mask = block_mask_factory("cuda", "flex")
    if compile_mode:
        compile_layers(drafter)
    embed, lm_weight = target.get_input_embeddings(), target.get_output_embeddings().weight
    tc = {"num_anchors": anchors, "gamma": 7.0, "loss_chunk": loss_chunk}
    gen = torch.Generator().manual_seed(rank)
    lens = torch.tensor([seq], device=dev)
    batches = [torch.randint(0, c.vocab_size - 300, (1, seq), generator=gen) for _ in range(4)]
    lmask = torch.zeros(1, seq, dtype=torch.bool, device=dev)
    lmask[:, seq // 8:] = True
    times = []
    for it in range(warmup + steps):
        if it == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ids = batches[it % len(batches)].to(dev, non_blocking=True)        # a new batch every step
        res = train_step_loss(target, drafter, c, ids, lmask, lens, tc, gen, make_block_mask, embed, lm_weight)
        res["loss"].backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    fwd = []
    with torch.no_grad():
        for it in range(warmup + steps):
            ids = batches[it % len(batches)].to(dev)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            target_features(target, ids, c.target_layer_ids)
            torch.cuda.synchronize()
            if it >= warmup:
                fwd.append(time.perf_counter() - t0)
    step_s, fwd_s = sorted(times)[len(times) // 2], sorted(fwd)[len(fwd) // 2]
    if world > 1:
        t = torch.tensor([step_s], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step_s = t.item()
    del drafter, opt
    torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "world_size": world, "seq": seq, "anchors": anchors,
            "path": "end-to-end (target forward + train_step_loss + backward + AdamW)", "compiled_layers": compile_mode,
            "ms_per_step": round(step_s * 1e3, 1), "samples_per_s_per_gpu": round(1 / step_s, 2),
            "samples_per_s": round(world / step_s, 2), "target_forward_ms": round(fwd_s * 1e3, 1),
            "target_forward_share": round(fwd_s / step_s, 3), "peak_mem_gib": round(peak, 2),
            "goal_samples_per_s_per_gpu": 4.5, "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 3072])
    p.add_argument("--anchors", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 over all ranks, optimised path only")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--loss-chunk", type=int, nargs="+", default=[2048], help="optimised path: rows per loss chunk")
    p.add_argument("--compile-layers", type=int, nargs="+", default=[1], choices=[0, 1],
                   help="optimised path: compile each decoder layer (1, what dflash.train does) or not (0)")
    p.add_argument("--with-target", action="store_true", help="end to end: the frozen 8B-shaped target's forward "
                   "and the train stage's own step function, FSDP2 over all ranks")
    p.add_argument("--json", help="append results to this file")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
    results = []
    if args.with_target:
        target = build_target(torch.device("cuda", torch.cuda.current_device()))
        for seq in args.seq:
            for comp in args.compile_layers:
                r = run_end_to_end(seq, args.anchors, args.steps, args.warmup, world, rank, args.loss_chunk[0],
                                   bool(comp), target)
                results.append(r)
                if rank == 0:
                    print(json.dumps(r), flush=True)
    for seq in ([] if args.with_target else args.seq):
        configs = [(True, ch, comp) for ch in args.loss_chunk for comp in args.compile_layers]
        if not (args.fsdp or args.no_baseline):
            configs.insert(0, (False, None, False))
        for fused, chunk, comp in configs:
            r = run_config(seq, args.anchors, fused, args.steps, args.warmup, world, rank, chunk or 0, comp)
            results.append(r)
            if rank == 0:
                print(json.dumps(r), flush=True)
        if not (args.fsdp or args.no_baseline) and rank == 0:
            base = results[-len(configs)]
            opt = min(results[-len(configs) + 1:], key=lambda r: r["ms_per_step"])
            print(json.dumps({"seq": seq, "speedup_vs_baseline": round(base["ms_per_step"] / opt["ms_per_step"], 3),
                              "speedup_vs_specforge_h200_220.6ms": round(220.6 / opt["ms_per_step"], 3)}), flush=True)
    if args.json and rank == 0:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
