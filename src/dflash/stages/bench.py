"""bench: one dataset through a spec-decode engine, as per-request records, against the baseline stage's
target-only records of the same dataset.

`records.jsonl` holds one line per (prompt, turn): dataset, prompt id, turn, the output token ids, accepted length
per step (local engines), verify steps and token counts (every engine: both tau definitions follow from them, see
`dflash.decoding.metrics.tau_definitions`), times (prefill; decode from the end of prefill, the project's clock; the
drafter's first pass; decode from the end of that pass, z-lab's clock), the baseline's (copied from the baseline
stage's record of the same prompt and turn), and at T=0 whether the output equals the baseline's, with the first
differing position and the target's top-2 logit gap there when it does not. A later turn's prompt holds the
engine's own earlier answers, so DFlash and baseline see the same prompt only where the earlier turns were equal
(`baseline.same_prompt`; only those are checked).
`summary.json` holds the metrics computed from those records (`dflash.decoding.metrics`), labelled with backend,
hardware, temperature and n, the baseline used (key, hardware, engine) and the engine: a local model loaded once
per job, or an SGLang server started once per job (command, start-up time, log), whichever dataset of the job
started it; `started_here` says whether this dataset paid for it.
Engines: `hf` (the eager HF loop) and `fast` (static caches, CUDA graphs on a GPU), both `dflash.decoding.engine`;
`sglang` (a DFLASH server). The drafter is the convert stage's output or, for a run with `drafter.pretrained`, the
directory it names (a hub id is fetched into the HF cache).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dflash.data import chat
from dflash.data.benchmarks import load_prompts
from dflash.data.jsonl import read_jsonl, write_jsonl
from dflash.decoding import metrics
from dflash.decoding import sglang as sg
from dflash.decoding.engine import Engine
from dflash.errors import InputError
from dflash.modeling.drafter import DFlashDrafter, pretrained_dir
from dflash.modeling.target import load_target, load_tokenizer


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


@contextlib.contextmanager
def own_engines(ctx):
    """A context that shares nothing (one instance outside a job, as in a test or a script): engines of its own,
    closed when it is done."""
    from dflash.stages.runner import Shared

    shared = Shared(Path(ctx.work) / "engines")
    try:
        yield replace(ctx, shared=shared)
    finally:
        shared.close()


def run(ctx) -> dict:
    if ctx.shared is None:
        with own_engines(ctx) as own:
            return run(own)
    bc, ds = ctx.config["bench"], ctx.config["dataset"]
    if bc["engine"] == "sglang":
        sg.require_sglang()
    prompts, meta = load_prompts(ds)
    drafter_dir, drafter_inputs, drafter_info = drafter_location(ctx)
    base = read_baseline(Path(ctx.upstream["baseline"])) if "baseline" in ctx.upstream else None
    engine = _sglang_records if bc["engine"] == "sglang" else _local_records
    records, info, top2 = engine(ctx, bc, ds, prompts, drafter_dir)
    if base is not None:
        attach_baseline(records, base, bc["temperature"], top2)
        info["baseline"] = base.info()
        if bc["engine"] == "sglang":
            info.update(_throughput(records, info, base.summary))
    for r in records:
        r.pop("prompt_ids", None)
    write_jsonl(ctx.out / "records.jsonl", records)
    summary = metrics.summarize(records, info["block_size"])
    summary.update(metrics.tau_definitions(records))
    summary.update({"dataset": ds["name"], "temperature": bc["temperature"], **info, "drafter": drafter_info,
                    "prompt_ids": meta["ids"], "source": meta["source"]})
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    lossless = summary.get("lossless")
    ctx.log(f"bench {ds['name']} ({info['backend']}): n={summary['n_requests']} tau {summary['tau_macro']:.3f} "
            f"(token-weighted {summary['tau_token']:.3f}) decode-only speedup {summary.get('speedup_decode_zlab')} "
            f"(z-lab timing), {summary.get('speedup_decode_only')} (project timing) lossless {lossless}")
    if bc["temperature"] == 0 and base is not None and not lossless and info.get("dtype") == "float32":
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


# ---------------------------------------------------------------------------------------------- the baseline

# fields of a baseline record that a bench record carries in its `baseline` entry
BASELINE_FIELDS = ("n_tokens", "prefill_s", "decode_s", "decode_s_zlab", "e2e_s", "ttft_s", "server_e2e_s", "tokens")


def prompt_digest(ids: list[int]) -> str:
    """A short digest of a prompt's token ids: equal prompts of DFlash and baseline records."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


@dataclass
class Baseline:
    directory: Path
    records: dict[tuple[str, int], dict]          # (prompt id, turn) -> record
    summary: dict

    def info(self) -> dict:
        """What a bench summary records of the baseline it used."""
        s = self.summary
        return {"key": self.directory.name, "backend": s.get("backend"), "hardware": s.get("hardware"),
                "dtype": s.get("dtype"), "engine": s.get("engine")}


def read_baseline(directory: Path) -> Baseline:
    recs = read_jsonl(directory / "records.jsonl")
    return Baseline(directory, {(r["prompt_id"], r["turn"]): r for r in recs},
                    json.loads((directory / "summary.json").read_text()))


def attach_baseline(records: list[dict], base: Baseline, temperature: float, top2=None) -> None:
    """Each record gets the baseline's record of the same prompt and turn (`baseline`); at T=0, where both saw
    the same prompt, whether the outputs are equal (`check_lossless`)."""
    for rec in records:
        b = base.records.get((rec["prompt_id"], rec["turn"]))
        if b is None:
            raise InputError(f"bench: baseline {base.directory} has no record of {rec['prompt_id']} turn "
                             f"{rec['turn']}; rerun its baseline stage")
        same = b.get("prompt_sha") == rec.get("prompt_sha")
        rec["baseline"] = {**{k: b[k] for k in BASELINE_FIELDS if k in b}, "same_prompt": same}
        if temperature == 0 and same and "tokens" in rec and "tokens" in b:
            check_lossless(rec, rec.get("prompt_ids", []), rec["tokens"], b["tokens"], top2)


# ---------------------------------------------------------------------------------------------- local engines


@dataclass
class LocalEngine:
    """A target (and drafter) loaded once per job, its decode engine warmed up once."""

    engine: Engine
    tokenizer: object
    eos: set[int]
    device: str
    info: dict                  # kind, load_s, warmup_s, command, pid
    warm: bool = False


@contextlib.contextmanager
def local_engine(ctx, bc: dict, drafter_dir: Path | None):
    """The `hf` / `fast` engine of a job: target (and drafter) loaded on first use, kept for its other datasets."""
    t0 = time.perf_counter()
    device = _device(bc["device"])
    dtype = getattr(torch, bc["dtype"])
    target, tokenizer = load_target(Path(ctx.upstream["target"]), device, dtype)
    drafter = None
    if drafter_dir is not None:
        drafter = DFlashDrafter.load(drafter_dir, device, dtype)
        drafter.config.check_target(target.config, str(drafter_dir / "config.json"))
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(target.generation_config, "eos_token_id", None)))
    bs = bc.get("block_size") or (drafter.config.block_size if drafter is not None else None)
    engine = Engine(bc["engine"], target, drafter, bs, compile=bool(bc.get("fast", {}).get("compile")))
    info = {"kind": bc["engine"], "load_s": time.perf_counter() - t0, "warmup_s": 0.0, **ctx.shared.job}
    ctx.log(f"{bc['engine']} engine loaded in {info['load_s']:.1f} s (target{' + drafter' if drafter else ''})")
    yield LocalEngine(engine, tokenizer, eos, device, info)


def local_conversations(le: LocalEngine, bc: dict, prompts, decode) -> list[dict]:
    """Every (prompt, turn) through `decode(ids) -> Generation`; a later turn sees this engine's earlier answers.
    Records without engine-specific fields: prompt, counts, times, tokens."""
    n_new = bc["max_new_tokens"]

    def prompt_ids(history) -> list[int]:
        return chat.prompt_ids(le.tokenizer, chat.messages(history, bc["system_prompt"]), bc["enable_thinking"])

    if not le.warm:                        # once per engine: kernels, allocator, graphs (not timed)
        first = [prompt_ids([("user", p.turns[0])]) for p in prompts]
        le.info["warmup_s"] = le.engine.warm_up(first[0], max(map(len, first)) + n_new)
        le.warm = True
    out = []
    for p in prompts:
        history = []
        for turn, text in enumerate(p.turns):
            history.append(("user", text))
            ids = prompt_ids(history)
            le.engine.prepare(len(ids) + n_new, headroom=n_new)    # a later turn may need longer caches: not timed
            g = decode(ids)
            out.append({"prompt_id": p.id, "turn": turn, "prompt_tokens": len(ids), "prompt_sha": prompt_digest(ids),
                        "n_tokens": len(g.tokens), "prefill_s": g.prefill_s, "decode_s": g.decode_s,
                        "decode_s_zlab": g.decode_s_zlab, "tokens": g.tokens, "prompt_ids": ids, "gen": g})
            history.append(("assistant", le.tokenizer.decode(g.tokens, skip_special_tokens=True)))
    return out


def engine_summary(le_info: dict, started_here: bool, capture: tuple[float, int]) -> dict:
    return {**le_info, "started_here": started_here, "capture_s": capture[0], "captures": capture[1]}


def _local_records(ctx, bc: dict, ds: dict, prompts, drafter_dir: Path):
    """Engines `hf` and `fast`: every (prompt, turn) through DFlash on the job's engine."""
    started = "local" not in ctx.shared.started
    le = ctx.shared.get("local", lambda: local_engine(ctx, bc, drafter_dir))
    engine, n_new, temp = le.engine, bc["max_new_tokens"], bc["temperature"]
    gen = torch.Generator(device=le.device).manual_seed(bc["seed"])
    c0 = (engine.capture_s, engine.captures)
    rows = local_conversations(le, bc, prompts, lambda ids: engine.dflash(ids, n_new, le.eos, temp, gen))
    records = []
    for r in rows:
        g = r.pop("gen")
        records.append({"dataset": ds["name"], **r, "accept_lengths": g.accept_lengths,
                        "verify_steps": metrics.output_steps(g.accept_lengths, r["n_tokens"]),
                        "draft_prefill_s": g.draft_prefill_s})
    capture = (engine.capture_s - c0[0], engine.captures - c0[1])
    info = {"backend": bc["engine"], "device": le.device, "hardware": hardware(le.device),
            "block_size": engine.bs, "dtype": bc["dtype"], "cuda_graphs": engine.graphs,
            "compiled": bool(bc.get("fast", {}).get("compile")),
            "warmup_s": le.info["warmup_s"] if started else 0.0, "capture_s": capture[0], "captures": capture[1],
            "engine": engine_summary(le.info, started, capture)}
    return records, info, engine.top2


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------------------------- SGLang engine


@dataclass
class Served:
    """An SGLang server of a job (started once, stopped when the job ends) and what the requests need."""

    server: sg.SGLangServer
    tokenizer: object
    options: dict
    block_size: int | None
    info: dict                  # kind, command, startup_s, log, pid
    warm: bool = False


def _scratch() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="dflash-sglang-"))       # not in the output: never hashed
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


@contextlib.contextmanager
def sglang_server(ctx, bc: dict, name: str, drafter_dir: Path | None):
    """The job's SGLang server `name` (DFLASH with a drafter, else target-only): started on first use, healthy
    inside, stopped (the whole process group) when the job ends; SIGTERM of the job stops it too, and a killed job's
    server gets SIGTERM from the kernel (`dflash.decoding.sglang`)."""
    opt = sg.options(bc, 1)
    target_dir = Path(ctx.upstream["target"])
    tokenizer = load_tokenizer(target_dir)
    spec, bs = sg.target_spec(target_dir, opt, opt["dtype"] or bc["dtype"], bc["seed"], bc["temperature"],
                              _scratch), None
    if drafter_dir is not None:
        draft = drafter_dir.resolve()
        sg.check_draft(draft, json.loads((Path(spec.model_path) / "config.json").read_text())["num_hidden_layers"])
        bs = bc.get("block_size") or int(json.loads((draft / "config.json").read_text())["block_size"])
        spec = replace(spec, draft_model_path=str(draft), block_size=bs)
    log_path = ctx.shared.log_dir / f"sglang-{name}.log"
    with sg.sigterm_as_exit():
        srv = sg.SGLangServer(sg.server_command(spec), log_path, env=opt["env"],
                              startup_timeout_s=float(opt["startup_timeout_s"]),
                              stop_grace_s=float(opt["stop_grace_s"]), log=ctx.log)
        with srv:
            yield Served(srv, tokenizer, opt, bs, {"kind": f"sglang-{name}", "server_command": srv.cmd,
                                                   "startup_s": srv.startup_s, "log": str(log_path),
                                                   **ctx.shared.job})


def serve_conversations(ctx, served: Served, bc: dict, prompts) -> tuple[list[dict], float]:
    """Every conversation of the dataset through the server; records without engine-specific fields."""
    opt, tok = served.options, served.tokenizer
    conc, stream, tmo = int(opt["concurrency"]), bool(opt["stream"]), float(opt["request_timeout_s"])

    def build_text(history):
        return chat.render(tok, chat.messages(history, bc["system_prompt"]), add_generation_prompt=True,
                           enable_thinking=bc["enable_thinking"])

    def reply_text(c: sg.Completion) -> str:          # as the HF engine: the decoded tokens, special tokens skipped
        return tok.decode(c.output_ids, skip_special_tokens=True) if c.output_ids is not None else c.text

    if not served.warm:
        sg.warm_up(served.server.url, build_text([("user", prompts[0].turns[0])]), conc, tmo)
        served.warm = True
    sg.flush_cache(served.server.url)                 # each dataset starts from an empty prefix cache
    convs, wall = sg.run_conversations(served.server.url, [list(p.turns) for p in prompts], build_text, reply_text,
                                       sg.sampling_params(bc["temperature"], bc["max_new_tokens"]), conc, stream, tmo)
    rows, mismatch = [], 0
    for p, conv in zip(prompts, convs, strict=True):
        for turn, (text, c) in enumerate(conv):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if c.prompt_tokens is not None and c.prompt_tokens != len(ids):
                mismatch += 1
            rows.append({"prompt_id": p.id, "turn": turn, "prompt_tokens": len(ids), "prompt_sha": prompt_digest(ids),
                         "server_prompt_tokens": c.prompt_tokens, "n_tokens": c.completion_tokens,
                         "server_e2e_s": c.server_e2e_s, "finish_reason": c.finish_reason, **sg.timing(c),
                         **({"tokens": c.output_ids} if c.output_ids is not None else {}), "completion": c})
    if mismatch:
        ctx.log(f"warning: SGLang counted other prompt lengths than the local tokenizer for {mismatch} request(s) "
                "(a BOS added by the server?)")
    # the server's log so far (command, settings it read, start-up) travels with each dataset it served
    shutil.copyfile(served.server.log_path, ctx.out / served.server.log_path.name)
    return rows, wall


def _sglang_records(ctx, bc: dict, ds: dict, prompts, drafter_dir: Path):
    """The job's DFLASH server (started by its first dataset) on every conversation of this one."""
    started = "sglang-dflash" not in ctx.shared.started
    served = ctx.shared.get("sglang-dflash", lambda: sglang_server(ctx, bc, "dflash", drafter_dir))
    rows, wall = serve_conversations(ctx, served, bc, prompts)
    records = []
    for r in rows:
        c = r.pop("completion")
        records.append({"dataset": ds["name"], **r, "accept_lengths": [], "verify_steps": c.spec_verify_ct,
                        "spec_accept_length": c.spec_accept_length, "spec_verify_ct": c.spec_verify_ct})
    tokens = sum(r["n_tokens"] for r in records)
    info = {"backend": "sglang", "device": "cuda", "hardware": hardware("cuda", count=True),
            "block_size": served.block_size, "dtype": served.options["dtype"] or bc["dtype"],
            "concurrency": int(served.options["concurrency"]),
            "timing": "stream (prefill = time to first token)" if served.options["stream"] else "e2e only",
            "tau_definition": "SGLang spec_accept_length = completion tokens / verify steps (includes the "
                              "prefill token and the bonus)",
            "sglang_version": sg.sglang_version(), "server_commands": {"dflash": served.server.cmd},
            "server_startup_s": {"dflash": served.server.startup_s if started else 0.0},
            "engine": {**served.info, "started_here": started},
            "wall_s_dflash": wall, "throughput_tok_s_dflash": tokens / wall if wall else None}
    return records, info, None


def _throughput(records: list[dict], info: dict, base_summary: dict) -> dict:
    """SGLang: the baseline's wall time and throughput on its own run of the dataset, and the ratio."""
    out = {"wall_s_baseline": base_summary.get("wall_s"),
           "throughput_tok_s_baseline": base_summary.get("throughput_tok_s")}
    if info.get("throughput_tok_s_dflash") and out["throughput_tok_s_baseline"]:
        out["speedup_throughput"] = info["throughput_tok_s_dflash"] / out["throughput_tok_s_baseline"]
    return out
