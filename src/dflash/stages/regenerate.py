"""regenerate: the target answers every training prompt (the paper's recipe: train on the target's own outputs).

The first user turn (plus an optional system prompt) is sent to the target; its reply replaces the original
assistant turn. Prompts are split in chunks of `chunk_size` rows (one scheme for both engines); each finished chunk
is written under the stage's work directory (`chunk-NNNNN.jsonl`, plus `chunk-NNNNN.meta.json` with the engine, new
tokens and seconds), so a killed job resumes by skipping finished chunks.

Engines: `hf` (transformers `generate`, batched, on the GPU if there is one) and `sglang`: N target-only SGLang
servers (one per GPU, or per `tp_size` GPUs), each given whole chunks, `batch_size` requests in flight per server,
through Ray actors when Ray is installed (else local processes). Without sglang or a GPU the `sglang` engine falls
back to `hf`, and the summary (provenance.json) says which engine ran and why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from dflash.data import chat
from dflash.data.jsonl import write_jsonl
from dflash.decoding import sglang as sg
from dflash.modeling.target import load_target, load_tokenizer
from dflash.stages import prepare

CHUNK = 256
LAYOUT = "layout.json"


def _generate(model, tokenizer, prompts: list[list[int]], cfg: dict, device: str) -> list[str]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, p in enumerate(prompts):              # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    sample = cfg["temperature"] > 0
    out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=cfg["max_new_tokens"],
                         do_sample=sample, temperature=cfg["temperature"] if sample else None, top_p=None, top_k=None,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]


# ---------------------------------------------------------------------------------------------- chunks


def chunk_file(work: Path, index: int) -> Path:
    return work / f"chunk-{index:05d}.jsonl"


def _meta_file(work: Path, index: int) -> Path:
    return work / f"chunk-{index:05d}.meta.json"


def _user(row: dict) -> dict:
    return next(m for m in row["messages"] if m["role"] == "user")


def _check_layout(work: Path, rows: list[dict], chunk: int) -> None:
    """Chunks of an earlier run are reused only if they cut the same prompts the same way."""
    digest = hashlib.sha256("\n".join(str(r["id"]) for r in rows).encode()).hexdigest()
    layout = {"chunk_size": chunk, "prompts": len(rows), "ids_sha256": digest}
    path = work / LAYOUT
    if path.is_file():
        old = json.loads(path.read_text())
        if old != layout:
            raise ValueError(f"regenerate: {work} holds chunks of another layout ({old} vs now {layout}); "
                             f"delete that directory to regenerate from scratch")
    elif any(work.glob("chunk-*.jsonl")) and chunk != CHUNK:    # chunks of a version without layout.json
        raise ValueError(f"regenerate: {work} holds chunks of {CHUNK} prompts, not {chunk}; delete that directory "
                         f"to regenerate from scratch")
    else:
        path.write_text(json.dumps(layout, indent=1))


def _write_chunk(work: Path, index: int, part: list[dict], replies: list[str], meta: dict) -> None:
    """Sidecar first, then the chunk by atomic rename: a chunk file exists only when complete."""
    tmp_meta = _meta_file(work, index).with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, _meta_file(work, index))
    target = chunk_file(work, index)
    tmp = target.with_suffix(".tmp")
    write_jsonl(tmp, ({"id": r["id"], "messages": [_user(r), {"role": "assistant", "content": reply}]}
                      for r, reply in zip(part, replies, strict=True)))
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------- HF engine


def _run_hf(rc: dict, parts: dict[int, list[dict]], upstream: dict[str, Path], work: Path, log) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_target(upstream["target"], device)
    new_tokens = 0
    for done, (index, part) in enumerate(parts.items(), 1):
        t0 = time.time()
        torch.manual_seed(rc["seed"] + index)       # per chunk: a resumed run samples as an uninterrupted one
        prompts = [chat.prompt_ids(tokenizer, chat.messages([_user(r)], rc["system_prompt"])) for r in part]
        replies = []
        for b0 in range(0, len(part), rc["batch_size"]):
            replies += _generate(model, tokenizer, prompts[b0:b0 + rc["batch_size"]], rc, device)
        n = sum(len(tokenizer(reply, add_special_tokens=False)["input_ids"]) for reply in replies)
        seconds = time.time() - t0
        _write_chunk(work, index, part, replies, {"engine": "hf", "device": device, "prompts": len(part),
                                                  "new_tokens": n, "seconds": seconds})
        new_tokens += n
        log(f"regenerate: chunk {index} done ({done}/{len(parts)} this run), {n} tokens in {seconds:.1f} s "
            f"({n / max(seconds, 1e-9):.1f} tok/s)")
    return {"new_tokens": new_tokens, "device": device}


# ---------------------------------------------------------------------------------------------- SGLang engine


def _run_sglang(rc: dict, parts: dict[int, list[dict]], upstream: dict[str, Path], work: Path, log) -> dict:
    opt = sg.options(rc, rc["batch_size"])
    tp = int(opt["tp_size"])
    n = int(opt["replicas"] or max(1, sg.gpu_count() // tp))
    n = min(n, len(parts))
    use_ray = opt["use_ray"] if opt["use_ray"] is not None else importlib.util.find_spec("ray") is not None
    tokenizer = load_tokenizer(upstream["target"])
    spec = sg.target_spec(upstream["target"], opt, opt["dtype"], rc["seed"], rc["temperature"], lambda: work)
    cmd = sg.server_command(spec)
    concurrency = opt["concurrency"]
    call = {"sampling": sg.sampling_params(rc["temperature"], rc["max_new_tokens"]),
            "concurrency": concurrency, "stream": False, "timeout_s": float(opt["request_timeout_s"])}
    logs = (work / "server-logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    log(f"regenerate: {n} SGLang replica(s) x tp {tp} via {'Ray' if use_ray else 'local processes'}, "
        f"{concurrency} requests in flight each: {' '.join(cmd)}")

    def texts_of(index: int) -> list[str]:
        return [chat.render(tokenizer, chat.messages([_user(r)], rc["system_prompt"]), add_generation_prompt=True)
                for r in parts[index]]

    totals = {"new_tokens": 0, "done": 0}

    def on_done(index: int, result: dict) -> None:
        done = result["completions"]
        replies = [c["text"].strip() for c in done]
        tokens = sum(c["completion_tokens"] for c in done)
        _write_chunk(work, index, parts[index], replies, {"engine": "sglang", "device": "cuda",
                                                          "prompts": len(done), "new_tokens": tokens,
                                                          "seconds": result["seconds"]})
        totals["new_tokens"] += tokens
        totals["done"] += 1
        log(f"regenerate: chunk {index} done ({totals['done']}/{len(parts)} this run), {tokens} tokens in "
            f"{result['seconds']:.1f} s ({tokens / max(result['seconds'], 1e-9):.1f} tok/s on one replica)")

    ray_started = False
    with sg.sigterm_as_exit():
        try:
            if use_ray:
                import ray

                if not ray.is_initialized():
                    ray.init()          # joins the cluster named by RAY_ADDRESS, else starts a local one
                    ray_started = True
            workers = (sg.start_ray_replicas if use_ray else sg.start_local_replicas)(n, tp, cmd, opt, logs, call, log)
            try:
                sg.dispatch(workers, parts, texts_of, on_done)
            finally:
                for w in workers:
                    w.close()
        finally:
            if ray_started:
                ray.shutdown()
    return {"new_tokens": totals["new_tokens"], "device": "cuda", "replicas": n, "tp_size": tp, "ray": use_ray,
            "concurrency": concurrency, "server_command": cmd}


# ---------------------------------------------------------------------------------------------- stage


def run(ctx) -> dict:
    rc, out, upstream, work, log = ctx.config["regenerate"], ctx.out, ctx.upstream, ctx.work, ctx.log
    rows = prepare.read(upstream["prepare"])
    size = int(rc.get("chunk_size") or CHUNK)
    n_chunks = (len(rows) + size - 1) // size
    work.mkdir(parents=True, exist_ok=True)
    _check_layout(work, rows, size)
    parts = {i: rows[i * size:(i + 1) * size] for i in range(n_chunks) if not chunk_file(work, i).is_file()}
    resumed = n_chunks - len(parts)
    if resumed:
        log(f"regenerate: resuming, {resumed}/{n_chunks} chunks already done in {work}")

    engine, fallback = rc["engine"], None
    if engine == "sglang":
        fallback = sg.unavailable_reason(need_gpu=True)
        if fallback:
            log(f"regenerate: engine sglang unavailable ({fallback}); falling back to the HF engine")
            engine = "hf"
    t0 = time.time()
    info = {"new_tokens": 0, "device": None}
    if parts:
        info = (_run_sglang if engine == "sglang" else _run_hf)(rc, parts, upstream, work, log)
    seconds = time.time() - t0

    with open(out / prepare.OUTPUT, "w") as f:
        for i in range(n_chunks):
            f.write(chunk_file(work, i).read_text())
    metas = [json.loads(_meta_file(work, i).read_text()) if _meta_file(work, i).is_file() else {}
             for i in range(n_chunks)]
    total = sum(m.get("new_tokens", 0) for m in metas) if all(metas) else None
    new_tokens = info.pop("new_tokens")
    tps = new_tokens / seconds if seconds > 0 and new_tokens else None
    log(f"regenerate: {len(rows)} prompts, {new_tokens} new tokens in {seconds:.1f} s "
        f"({f'{tps:.1f}' if tps else '-'} tok/s, engine {engine}), chunks resumed {resumed}/{n_chunks}")
    return {"summary": {"prompts": len(rows), "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": tps,
                        "chunks": n_chunks, "chunk_size": size, "chunks_resumed": resumed,
                        "chunks_generated": len(parts), "total_tokens": total, "engine": engine,
                        "engine_requested": rc["engine"], "fallback": fallback,
                        "chunk_engines": sorted({m["engine"] for m in metas if m.get("engine")}), **info}}
