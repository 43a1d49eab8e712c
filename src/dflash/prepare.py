"""prepare: training conversations from the configured sources, normalised to chat messages.

Output `conversations.jsonl`: {"id", "source", "messages": [{"role", "content"}, ...]} with the sources' original
responses (the seed PR's recipe trains on these; the paper's recipe replaces them in `regenerate`). Prompts equal to
a benchmark prompt of the phase are dropped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dflash import synthetic
from dflash.provenance import sha256_file

OUTPUT = "conversations.jsonl"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _from_record(fmt: str, rec: dict, where: str) -> list[dict]:
    try:
        if fmt == "messages":
            return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
        if fmt == "sharegpt":
            roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                     "system": "system"}
            return [{"role": roles[t["from"]], "content": t["value"]} for t in rec["conversations"]]
        if fmt == "alpaca":
            prompt = rec["instruction"] + (f"\n\nInput:\n{rec['input']}" if rec.get("input") else "")
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
        if fmt == "gsm8k":
            return [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["answer"]}]
        if fmt == "mbpp":
            return [{"role": "user", "content": rec["text"]},
                    {"role": "assistant", "content": f"```python\n{rec['code']}\n```"}]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: missing field {e} for format {fmt!r}") from None
    raise ValueError(f"{where}: unknown format {fmt!r}")


def _read_source(src: dict) -> tuple[list[dict], dict]:
    kind, seed = src["kind"], src.get("seed", 0)
    if kind == "synthetic":
        n = src.get("n", 600)
        rows = [{"id": f"synthetic/{fam}/{i}", "messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": r}]}
                for i, (fam, q, r) in enumerate(synthetic.mixed(n, synthetic.TRAIN_PROMPT_SEED + seed))]
        return rows, {}
    if kind == "jsonl":
        path = Path(src["path"])
        if not path.is_file():
            raise FileNotFoundError(f"data.sources: file {path} not found")
        rows = []
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    rec = json.loads(line)
                    rows.append({"id": f"{path.stem}/{rec.get('id', i)}",
                                 "messages": _from_record(src["format"], rec, f"{path}:{i + 1}")})
        inputs = {str(path): sha256_file(path)}
    else:
        from datasets import load_dataset

        ds = load_dataset(src["hub_id"], split=src.get("split", "train"))
        rows = [{"id": f"{src['hub_id']}/{i}", "messages": _from_record(src["format"], dict(r), f"{src['hub_id']}:{i}")}
                for i, r in enumerate(ds)]
        inputs = {}
    if "n" in src and src["n"] < len(rows):
        rows = random.Random(seed).sample(rows, src["n"])
    return rows, inputs


def benchmark_prompts(datasets: list[dict]) -> set[str]:
    """Normalised user turns of every benchmark set (with and without z-lab's math suffix)."""
    from dflash.bench import load_prompts
    from dflash.benchmarks import MATH_SUFFIX

    keys = set()
    for ds in datasets:
        prompts, _ = load_prompts(ds)
        for p in prompts:
            for t in p.turns:
                keys.add(_norm(t))
                keys.add(_norm(t.removesuffix(MATH_SUFFIX)))
    return keys


def run(cfg: dict, out: Path, log=print) -> dict:
    data = cfg["data"]
    rows, inputs = [], {}
    for src in data["sources"]:
        r, i = _read_source(src)
        rows += r
        inputs.update(i)
    n_read = len(rows)
    excluded = 0
    if data.get("benchmarks"):
        bench = benchmark_prompts(data["benchmarks"])
        kept = [r for r in rows if _norm(next(m["content"] for m in r["messages"] if m["role"] == "user")) not in bench]
        excluded = len(rows) - len(kept)
        rows = kept
    rows = [r for r in rows if any(m["role"] == "user" for m in r["messages"])]
    if not rows:
        raise ValueError("data.sources: no conversations left after filtering")
    with open(out / OUTPUT, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    log(f"prepare: {n_read} read, {excluded} equal to a benchmark prompt dropped, {len(rows)} written")
    return {"inputs": inputs, "summary": {"read": n_read, "excluded_benchmark": excluded, "written": len(rows)}}


def read(directory: Path) -> list[dict]:
    with open(Path(directory) / OUTPUT) as f:
        return [json.loads(line) for line in f]
