"""bench: one dataset through a spec-decode engine (and the target-only baseline), as per-request records.

`records.jsonl` holds one line per (prompt, turn): dataset, prompt id, turn, the output token ids, accepted length
per step, token counts, times (prefill; decode from the end of prefill, the project's clock; the drafter's first
pass; decode from the end of that pass, z-lab's clock), the baseline's, and at T=0 whether the output equals the
baseline's, with the first differing position and the target's top-2 logit gap there when it does not.
`summary.json` holds the metrics computed from those records (`dflash.decoding.metrics`), labelled with backend,
hardware, temperature and n, and the engine's warm-up and graph-capture time (outside every timed region).
Engines: `hf` (the eager HF loop) and `fast` (static caches, CUDA graphs on a GPU), both `dflash.decoding.engine`;
`sglang` (a DFLASH server and a target-only server). The drafter is the convert stage's output or, for a run with
`drafter.pretrained`, the directory it names (a hub id is fetched into the HF cache).
"""

from __future__ import annotations

import atexit
import json
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from dflash.data import chat
from dflash.data.benchmarks import load_prompts
from dflash.decoding import metrics
from dflash.decoding import sglang as sg
from dflash.decoding.engine import Engine
from dflash.errors import InputError
from dflash.modeling.drafter import DFlashDrafter, pretrained_dir
from dflash.modeling.target import load_target, load_tokenizer, model_path


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def hardware(device: str, count: bool = False) -> str:
    """The device's name (`count`: prefixed with the number of visible GPUs, for servers that may use several)."""
    if device != "cuda":
        return platform.machine() + " cpu"
    if not torch.cuda.is_available():            # SGLang servers may see GPUs this process does not
        return "cuda (not visible to the client)"
    return (f"{torch.cuda.device_count()}x " if count else "") + torch.cuda.get_device_name()


def drafter_location(ctx) -> tuple[Path, dict[str, str], dict]:
    """(drafter directory, {input: sha256} to record, what it is): the convert stage's output, or the directory a
    pretrained run names (checked against the checksums its key hashes)."""
    if "drafter" not in ctx.config:
        return Path(ctx.upstream["convert"]), {}, {"convert": Path(ctx.upstream["convert"]).name}
    directory, inputs, info = pretrained_dir(ctx.run["drafter"]["pretrained"])
    want = ctx.config["drafter"].get("files")
    got = {label.rpartition("/")[2]: digest for label, digest in inputs.items()}
    if want is not None and got != want:
        raise InputError(f"bench: {directory}: the drafter files changed since this stage was planned (sha256 "
                         "differs from its key); plan again")
    return directory, inputs, info


def run(ctx) -> dict:
    bc, ds = ctx.config["bench"], ctx.config["dataset"]
    if bc["engine"] == "sglang":
        sg.require_sglang()
    prompts, meta = load_prompts(ds)
    drafter_dir, drafter_inputs, drafter_info = drafter_location(ctx)
    engine = _sglang_records if bc["engine"] == "sglang" else _local_records
    records, info = engine(bc, ds, prompts, Path(ctx.upstream["target"]), drafter_dir, ctx.out, ctx.log)
    with open(ctx.out / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary = metrics.summarize(records, info["block_size"])
    summary.update({"dataset": ds["name"], "temperature": bc["temperature"], **info, "drafter": drafter_info,
                    "prompt_ids": meta["ids"], "source": meta["source"]})
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lossless = summary.get("lossless")
    ctx.log(f"bench {ds['name']} ({info['backend']}): n={summary['n_requests']} tau {summary['tau_macro']:.3f} "
            f"(token-weighted {summary['tau_token']:.3f}) decode-only speedup {summary.get('speedup_decode_zlab')} "
            f"(z-lab timing), {summary.get('speedup_decode_only')} (project timing) lossless {lossless}")
    if bc["temperature"] == 0 and bc["baseline"] and not lossless and info.get("dtype") == "float32":
        # in fp32 a mismatch is a bug; in bf16 a batched verify may round differently, so it is only recorded
        bad = {f"{r['prompt_id']}/{r['turn']}": r.get("mismatch") for r in records if not r.get("lossless", True)}
        raise AssertionError(f"bench {ds['name']}: spec-decode output differs from target greedy output: {bad}")
    inputs = {meta["source"]: meta["sha256"]} if meta.get("sha256") else {}
    return {"inputs": {**inputs, **drafter_inputs},
            "summary": {k: v for k, v in summary.items() if k != "prompt_ids"}}


def check_lossless(rec: dict, prompt_ids: list[int], out: list[int], base: list[int], top2=None) -> None:
    """Set `lossless` on a T=0 record; where the output differs from the baseline's, `mismatch` locates the first
    difference (and, given `top2(ids)`, the target's two best tokens and their logit gap after the common prefix)."""
    i = metrics.first_difference(out, base)
    rec["lossless"] = i is None
    if i is not None:
        rec["mismatch"] = {"position": i, "dflash_token": out[i] if i < len(out) else None,
                           "baseline_token": base[i] if i < len(base) else None,
                           **(top2(prompt_ids + base[:i]) if top2 else {})}


# ---------------------------------------------------------------------------------------------- local engines


def _local_records(bc: dict, ds: dict, prompts, target_dir: Path, drafter_dir: Path, out: Path,
                   log) -> tuple[list[dict], dict]:
    """Engines `hf` and `fast`: every (prompt, turn) through DFlash, then the baseline on the same prompt ids;
    later turns see the DFlash answers."""
    device = _device(bc["device"])
    dtype = getattr(torch, bc["dtype"])
    target, tokenizer = load_target(target_dir, device, dtype)
    drafter = DFlashDrafter.load(drafter_dir, device, dtype)
    drafter.config.check_target(target.config, str(drafter_dir / "config.json"))
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(target.generation_config, "eos_token_id", None)))
    bs = bc["block_size"] or drafter.config.block_size
    n_new, temp = bc["max_new_tokens"], bc["temperature"]
    compiled = bool(bc.get("fast", {}).get("compile"))
    engine = Engine(bc["engine"], target, drafter, bs, compile=compiled)
    gen = torch.Generator(device=device).manual_seed(bc["seed"])

    def prompt_ids(history) -> list[int]:
        return chat.prompt_ids(tokenizer, chat.messages(history, bc["system_prompt"]), bc["enable_thinking"])

    first = [prompt_ids([("user", p.turns[0])]) for p in prompts]
    warmup_s = engine.warm_up(first[0], max(map(len, first)) + n_new)
    records = []
    for p in prompts:
        history = []
        for turn, text in enumerate(p.turns):
            history.append(("user", text))
            ids = prompt_ids(history)
            engine.prepare(len(ids) + n_new, headroom=n_new)     # a later turn may need longer caches: not timed
            g = engine.dflash(ids, n_new, eos, temp, gen)
            rec = {"dataset": ds["name"], "prompt_id": p.id, "turn": turn, "prompt_tokens": len(ids),
                   "n_tokens": len(g.tokens), "accept_lengths": g.accept_lengths, "prefill_s": g.prefill_s,
                   "decode_s": g.decode_s, "draft_prefill_s": g.draft_prefill_s, "decode_s_zlab": g.decode_s_zlab,
                   "tokens": g.tokens}
            if bc["baseline"]:
                b = engine.target_generate(ids, n_new, eos, temp, gen)
                rec["baseline"] = {"n_tokens": len(b.tokens), "prefill_s": b.prefill_s, "decode_s": b.decode_s,
                                   "decode_s_zlab": b.decode_s_zlab, "tokens": b.tokens}
                if temp == 0:
                    check_lossless(rec, ids, g.tokens, b.tokens, engine.top2)
            records.append(rec)
            history.append(("assistant", tokenizer.decode(g.tokens, skip_special_tokens=True)))
    return records, {"backend": bc["engine"], "device": device, "hardware": hardware(device), "block_size": bs,
                     "dtype": bc["dtype"], "cuda_graphs": engine.graphs, "compiled": compiled,
                     "warmup_s": warmup_s, "capture_s": engine.capture_s, "captures": engine.captures}


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------------------------- SGLang engine


def _run_conversations(url: str, convs: list[list[str]], build_text, reply_text, sampling: dict, concurrency: int,
                       stream: bool, timeout_s: float) -> tuple[list[list[tuple[str, sg.Completion]]], float]:
    """Multi-turn conversations: turns of one conversation in order (each sees the model's earlier answers,
    `reply_text(completion)`), up to `concurrency` conversations in flight. Returns [(prompt text, completion) per
    turn] per conversation, and the wall time."""
    def one(turns: list[str]):
        history, out = [], []
        for user in turns:
            history.append(("user", user))
            text = build_text(history)
            c = sg.generate(url, text, sampling, stream, timeout_s)
            out.append((text, c))
            history.append(("assistant", reply_text(c)))
        return out

    t0 = time.perf_counter()
    if concurrency <= 1:
        res = [one(t) for t in convs]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            res = list(pool.map(one, convs))
    return res, time.perf_counter() - t0


def _timing(c: sg.Completion) -> dict:
    """prefill/decode split of a request: time to first token, and the rest (client clock)."""
    if c.ttft_s is None:
        return {"prefill_s": 0.0, "decode_s": c.e2e_s, "e2e_s": c.e2e_s, "ttft_s": None}
    return {"prefill_s": c.ttft_s, "decode_s": max(0.0, c.e2e_s - c.ttft_s), "e2e_s": c.e2e_s, "ttft_s": c.ttft_s}


def _warm_up(url: str, text: str, concurrency: int, timeout_s: float) -> None:
    sg.generate_many(url, [text] * concurrency, sg.sampling_params(0.0, 32), concurrency, False, timeout_s)
    sg.flush_cache(url)


def _sglang_records(bc: dict, ds: dict, prompts, target_dir: Path, drafter_dir: Path, out: Path,
                    log) -> tuple[list[dict], dict]:
    """The DFlash server, then (bench.baseline) the target-only server on exactly the same prompt texts."""
    opt = sg.options(bc, 1)
    tokenizer = load_tokenizer(target_dir)
    path, local = model_path(target_dir)
    draft = drafter_dir.resolve()
    if local:
        scratch = Path(tempfile.mkdtemp(prefix="dflash-sglang-"))       # not in the output: never hashed
        atexit.register(shutil.rmtree, scratch, True)
        path = sg.served_target(Path(path), scratch)
        sg.check_draft(draft, json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"])
    bs = bc["block_size"] or int(json.loads((draft / "config.json").read_text())["block_size"])
    base_spec = sg.ServerSpec(model_path=str(path), tp_size=int(opt["tp_size"]),
                              dtype=sg.served_dtype(opt["dtype"] or bc["dtype"]), seed=int(bc["seed"]),
                              sampling_backend=sg.sampling_backend(bc["temperature"]),
                              mem_fraction_static=opt["mem_fraction_static"],
                              attention_backend=opt["attention_backend"], extra_args=list(opt["extra_args"]))
    dflash_spec = replace(base_spec, draft_model_path=str(draft), block_size=bs)
    sampling = sg.sampling_params(bc["temperature"], bc["max_new_tokens"])
    conc, stream, tmo = int(opt["concurrency"]), bool(opt["stream"]), float(opt["request_timeout_s"])

    def build_text(history):
        return chat.render(tokenizer, chat.messages(history, bc["system_prompt"]), add_generation_prompt=True,
                           enable_thinking=bc["enable_thinking"])

    def reply_text(c: sg.Completion) -> str:          # as the HF engine: the decoded tokens, special tokens skipped
        return tokenizer.decode(c.output_ids, skip_special_tokens=True) if c.output_ids is not None else c.text

    def server(spec: sg.ServerSpec, name: str) -> sg.SGLangServer:
        return sg.SGLangServer(sg.server_command(spec), out / f"sglang-{name}.log", env=opt["env"],
                               startup_timeout_s=float(opt["startup_timeout_s"]),
                               stop_grace_s=float(opt["stop_grace_s"]), log=log)

    commands, startup = {}, {}
    first = build_text([("user", prompts[0].turns[0])])
    with sg.sigterm_as_exit():
        with server(dflash_spec, "dflash") as srv:
            commands["dflash"], startup["dflash"] = srv.cmd, srv.startup_s
            _warm_up(srv.url, first, conc, tmo)
            convs, wall = _run_conversations(srv.url, [list(p.turns) for p in prompts], build_text, reply_text,
                                             sampling, conc, stream, tmo)
        base, base_wall = None, None
        if bc["baseline"]:
            texts = [text for conv in convs for text, _ in conv]
            with server(base_spec, "baseline") as srv:
                commands["baseline"], startup["baseline"] = srv.cmd, srv.startup_s
                _warm_up(srv.url, first, conc, tmo)
                base, base_wall = sg.generate_many(srv.url, texts, sampling, conc, stream, tmo)

    records, i, mismatch = [], 0, 0
    for p, conv in zip(prompts, convs, strict=True):
        for turn, (text, c) in enumerate(conv):
            n_prompt = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if c.prompt_tokens is not None and c.prompt_tokens != n_prompt:
                mismatch += 1
            rec = {"dataset": ds["name"], "prompt_id": p.id, "turn": turn, "prompt_tokens": n_prompt,
                   "server_prompt_tokens": c.prompt_tokens, "n_tokens": c.completion_tokens, "accept_lengths": [],
                   "spec_accept_length": c.spec_accept_length, "spec_verify_ct": c.spec_verify_ct,
                   "server_e2e_s": c.server_e2e_s, "finish_reason": c.finish_reason, **_timing(c),
                   **({"tokens": c.output_ids} if c.output_ids is not None else {})}
            if base is not None:
                b = base[i]
                rec["baseline"] = {"n_tokens": b.completion_tokens, "server_e2e_s": b.server_e2e_s, **_timing(b),
                                   **({"tokens": b.output_ids} if b.output_ids is not None else {})}
                if bc["temperature"] == 0:
                    if c.output_ids is not None and b.output_ids is not None:
                        check_lossless(rec, [], c.output_ids, b.output_ids)
                    else:
                        rec["lossless"] = c.text == b.text
            records.append(rec)
            i += 1
    if mismatch:
        log(f"bench {ds['name']}: warning: SGLang counted other prompt lengths than the local tokenizer for "
            f"{mismatch} request(s) (a BOS added by the server?)")
    tokens = sum(r["n_tokens"] for r in records)
    info = {"backend": "sglang", "device": "cuda", "hardware": hardware("cuda", count=True), "block_size": bs,
            "dtype": opt["dtype"] or bc["dtype"], "concurrency": conc,
            "timing": "stream (prefill = time to first token)" if stream else "e2e only",
            "tau_definition": "SGLang spec_accept_length = completion tokens / verify steps (includes the "
                              "prefill token and the bonus)",
            "sglang_version": sg.sglang_version(), "server_commands": commands, "server_startup_s": startup,
            "wall_s_dflash": wall, "throughput_tok_s_dflash": tokens / wall if wall else None}
    if base is not None:
        b_tokens = sum(b.completion_tokens for b in base)
        info.update({"wall_s_baseline": base_wall,
                     "throughput_tok_s_baseline": b_tokens / base_wall if base_wall else None})
        if info["throughput_tok_s_dflash"] and info["throughput_tok_s_baseline"]:
            info["speedup_throughput"] = info["throughput_tok_s_dflash"] / info["throughput_tok_s_baseline"]
    return records, info
