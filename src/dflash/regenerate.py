"""regenerate: the target answers every training prompt (the paper's recipe: train on the target's own outputs).

The first user turn (plus an optional system prompt) is sent to the target; its reply replaces the original
assistant turn. Work is split in chunks written under the stage's work directory, so a killed job resumes by
skipping finished chunks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from dflash import chat, prepare
from dflash.target import load_target

CHUNK = 256


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


def run(cfg: dict, out: Path, upstream: dict[str, Path], work: Path, log=print) -> dict:
    rc = cfg["regenerate"]
    if rc["engine"] != "hf":
        raise NotImplementedError("regenerate.engine: 'sglang' needs the sglang extra on a GPU machine")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_target(upstream["target"], device)
    rows = prepare.read(upstream["prepare"])
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(rc["seed"])
    t0, new_tokens, skipped = time.time(), 0, 0
    for c0 in range(0, len(rows), CHUNK):
        chunk_file = work / f"chunk-{c0 // CHUNK:05d}.jsonl"
        if chunk_file.is_file():
            skipped += 1
            continue
        part = rows[c0:c0 + CHUNK]
        prompts = []
        for r in part:
            user = next(m for m in r["messages"] if m["role"] == "user")
            prompts.append(chat.prompt_ids(tokenizer, chat.messages([user], rc["system_prompt"])))
        replies = []
        for b0 in range(0, len(part), rc["batch_size"]):
            replies += _generate(model, tokenizer, prompts[b0:b0 + rc["batch_size"]], rc, device)
        tmp = chunk_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for r, reply in zip(part, replies, strict=True):
                user = next(m for m in r["messages"] if m["role"] == "user")
                new_tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
                f.write(json.dumps({"id": r["id"], "messages": [user, {"role": "assistant", "content": reply}]}) + "\n")
        os.replace(tmp, chunk_file)
        log(f"regenerate: chunk {c0 // CHUNK} done ({c0 + len(part)}/{len(rows)})")
    seconds = time.time() - t0
    with open(out / prepare.OUTPUT, "w") as f:
        for chunk_file in sorted(work.glob("chunk-*.jsonl")):
            f.write(chunk_file.read_text())
    tps = new_tokens / seconds if seconds > 0 and new_tokens else None
    log(f"regenerate: {len(rows)} prompts, {new_tokens} new tokens in {seconds:.1f} s, chunks skipped {skipped}")
    return {"summary": {"prompts": len(rows), "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": tps,
                        "chunks_resumed": skipped, "engine": rc["engine"], "device": device}}
