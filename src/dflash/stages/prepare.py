"""prepare: training conversations from the configured sources, normalised to chat messages.

Output `conversations.jsonl`: {"id", "messages": [{"role", "content"}, ...]} with the sources' original responses
(the seed PR's recipe trains on these; the paper's recipe replaces them in `regenerate`). Per source, rows whose id
(`id_field`) is listed in `exclude_ids` / `exclude_id_ranges` are skipped before the `n` sample is drawn (MBPP's
full file minus its test task ids, say). A source with `convert_from` holds records of that format, converted to
`format`'s fields and then read as `format` (a rehearsal's stand-in for a hub dataset). Then prompts equal to a
benchmark prompt of the phase are dropped (`data.exclude_benchmarks`, compared after whitespace/case normalisation,
with and without z-lab's math suffix), and with `data.dedup` every prompt after the first with the same first user
turn. Rows without an assistant reply (a
prompt-only ShareGPT file) are kept, since `regenerate` answers them; the summary counts them (`without_reply`), and
without regeneration tokenize drops them (no loss tokens).
"""

from __future__ import annotations

import random
from pathlib import Path

from dflash.checksums import sha256_file
from dflash.data import root as data_root
from dflash.data import synthetic
from dflash.data.benchmarks import MATH_SUFFIX, load_prompts
from dflash.data.jsonl import iter_jsonl, read_jsonl, write_jsonl
from dflash.errors import DataError

OUTPUT = "conversations.jsonl"


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


SHAPES = {"messages": 'expected {"messages": [{"role": ..., "content": ...}, ...]}',
          "sharegpt": 'expected {"conversations": [{"from": ..., "value": ...}, ...]}',
          "alpaca": 'expected {"instruction": ..., "input": ..., "output": ...}',
          "gsm8k": 'expected {"question": ..., "answer": ...}',
          "mbpp": 'expected {"text": ..., "code": ...}'}


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
    except KeyError as e:
        raise DataError(f"{where}: missing field {e} for format {fmt!r}") from None
    except TypeError:
        raise DataError(f"{where}: not a record of format {fmt!r} ({SHAPES[fmt]})") from None
    raise DataError(f"{where}: unknown format {fmt!r}")


def _to_record(fmt: str, msgs: list[dict], where: str) -> dict:
    """A conversation as a record of format `fmt` (`data.sources` convert_from: a local stand-in in another schema)."""
    if fmt == "messages":
        return {"messages": msgs}
    if fmt == "sharegpt":
        speaker = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in msgs]}
    if fmt == "alpaca":
        first = {m["role"]: m["content"] for m in reversed(msgs)}
        return {"instruction": first.get("user", ""), "input": "", "output": first.get("assistant", "")}
    raise ValueError(f"{where}: cannot convert records to format {fmt!r} (convert_from)")


def _excluded_id(src: dict, rid) -> bool:
    """Whether a row id is in the source's `exclude_ids` (compared as text) or an inclusive `exclude_id_ranges`
    interval (integer ids only)."""
    if str(rid) in {str(x) for x in src.get("exclude_ids") or []}:
        return True
    try:
        value = int(rid)
    except (TypeError, ValueError):
        return False
    return any(lo <= value <= hi for lo, hi in src.get("exclude_id_ranges") or [])


def _read_source(src: dict) -> tuple[list[dict], dict, int]:
    """(rows, input checksums, rows skipped by id) of one `data.sources` entry."""
    kind, seed = src["kind"], src.get("seed", 0)
    if kind == "synthetic":
        n = src.get("n", 600)
        rows = [{"id": f"synthetic/{fam}/{i}", "messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": r}]}
                for i, (fam, q, r) in enumerate(synthetic.mixed(n, synthetic.TRAIN_PROMPT_SEED + seed))]
        return rows, {}, 0
    fmt, id_field = src.get("format", "messages"), src.get("id_field")
    skipped = 0
    if kind == "jsonl":
        path = data_root.resolve(src["path"])
        if not path.is_file():
            if data_root.is_rooted(src["path"]):
                raise FileNotFoundError(f"data.sources: {data_root.missing(src['path'])}; {data_root.HOW}")
            raise FileNotFoundError(f"data.sources: file {path} not found")
        rows = []
        for where, i, rec in iter_jsonl(path):
            if id_field and id_field not in rec:
                raise DataError(f"{where}: missing id field {id_field!r} (data.sources id_field)")
            rid = rec[id_field] if id_field else rec.get("id", i)
            if _excluded_id(src, rid):
                skipped += 1
                continue
            if src.get("convert_from"):
                rec = _to_record(fmt, _from_record(src["convert_from"], rec, where), where)
            rows.append({"id": f"{path.parent.name}/{path.stem}/{rid}", "messages": _from_record(fmt, rec, where)})
        inputs = {src["path"] if data_root.is_rooted(src["path"]) else str(path): sha256_file(path)}
    else:
        from datasets import load_dataset

        ds = load_dataset(src["hub_id"], split=src.get("split", "train"))
        rows = []
        for i, r in enumerate(ds):
            rec, where = dict(r), f"{src['hub_id']}:{i}"
            if id_field and id_field not in rec:
                raise DataError(f"{where}: missing id field {id_field!r} (data.sources id_field)")
            rid = rec[id_field] if id_field else i
            if _excluded_id(src, rid):
                skipped += 1
                continue
            rows.append({"id": f"{src['hub_id']}/{rid}", "messages": _from_record(fmt, rec, where)})
        inputs = {}
    if "n" in src and src["n"] < len(rows):
        rows = random.Random(seed).sample(rows, src["n"])
    return rows, inputs, skipped


def benchmark_prompts(datasets: list[dict]) -> set[str]:
    """Normalised user turns of every benchmark set (with and without z-lab's math suffix)."""
    keys = set()
    for ds in datasets:
        prompts, _ = load_prompts(ds)
        for p in prompts:
            for t in p.turns:
                keys.add(_norm(t))
                keys.add(_norm(t.removesuffix(MATH_SUFFIX)))
    return keys


def _first_user(row: dict) -> str | None:
    return next((m["content"] for m in row["messages"] if m["role"] == "user"), None)


def run(ctx) -> dict:
    data, out, log = ctx.config["data"], ctx.out, ctx.log
    rows, inputs, skipped_ids, per_source = [], {}, 0, []
    for src in data["sources"]:
        r, i, skipped = _read_source(src)
        rows += r
        inputs.update(i)
        skipped_ids += skipped
        per_source.append({"kind": src["kind"], "name": src.get("path") or src.get("hub_id") or "synthetic",
                           "format": src.get("format", "messages"), "rows": len(r), "excluded_ids": skipped,
                           **({"converted_from": src["convert_from"]} if src.get("convert_from") else {})})
    n_read = len(rows)
    rows = [r for r in rows if _first_user(r) is not None]
    no_user = n_read - len(rows)
    excluded = 0
    if data.get("benchmarks"):
        bench = benchmark_prompts(data["benchmarks"])
        kept = [r for r in rows if _norm(_first_user(r)) not in bench]
        excluded = len(rows) - len(kept)
        rows = kept
    duplicates = 0
    if data.get("dedup"):
        seen, kept = set(), []
        for r in rows:
            key = _norm(_first_user(r))
            if key not in seen:
                seen.add(key)
                kept.append(r)
        duplicates = len(rows) - len(kept)
        rows = kept
    if not rows:
        raise DataError("data.sources: no conversations left after filtering")
    without_reply = sum(1 for r in rows if not any(m["role"] == "assistant" and m["content"] for m in r["messages"]))
    write_jsonl(out / OUTPUT, rows)
    log(f"prepare: {n_read} read ({skipped_ids} skipped by id before sampling), {no_user} without a user turn, "
        f"{excluded} equal to a benchmark prompt, {duplicates} duplicate prompts dropped; {len(rows)} written, "
        f"{without_reply} of them without an assistant reply")
    return {"inputs": inputs, "summary": {"read": n_read, "excluded_ids": skipped_ids, "no_user_turn": no_user,
                                          "excluded_benchmark": excluded, "duplicates": duplicates,
                                          "written": len(rows), "without_reply": without_reply,
                                          "sources": per_source}}


def read(directory: Path) -> list[dict]:
    return read_jsonl(Path(directory) / OUTPUT)
