"""Issue 15: the fast engine in the bench stage, both clocks, diffable records, published drafters as runs.

On CPU at float32: the fast engine commits the target's greedy tokens and the HF engine's, request by request,
through the bench stage on the smoke target and drafter (synthetic prompts and a two-turn MT-Bench file), and
through the engine interface with EOS inside a block. A run with `drafter.pretrained` plans target and bench only,
keyed by its files' sha256 or its hub id, and benches a convert-stage directory, a directory laid out as z-lab
publishes theirs, and a hub id found in a local Hugging Face cache; its phase reports and audits clean."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from dflash import cli
from dflash.data.jsonl import read_jsonl
from dflash.decoding import metrics
from dflash.decoding.engine import Engine
from dflash.decoding.hf import target_generate
from dflash.errors import ConfigError, DataError
from dflash.modeling.drafter import DFlashDrafter, DrafterConfig, pretrained_dir
from dflash.plan import pretrained
from dflash.plan.config import load_phase
from dflash.plan.keys import build
from dflash.plan.paths import ResultsTree
from dflash.plan.stages import DRAFT_ONLY
from dflash.results import audit, report
from dflash.stages import baseline, bench, runner
from test_model import _drafter, tiny_target

PROMPT = [5, 17, 3, 42, 8, 9, 11]
MT_BENCH = [{"question_id": 901, "category": "math", "turns": ["What is 12 plus 30?", "Now divide it by 6."]},
            {"question_id": 902, "category": "writing", "turns": ["Write one line about rivers.", "Make it rhyme."]}]
HUB_ID, COMMIT = "z-lab/tiny-DFlash-b16", "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- engine interface


def test_engines_equal_target_greedy_with_eos_inside_a_block_and_time_the_first_pass():
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    truth = target_generate(target, PROMPT, 40, eos=set()).tokens
    first = next(i for i in range(2, 15) if truth[i] not in truth[:i])
    eos = {truth[first]}

    def oracle(tokens, start, drafts, bs):          # the drafter runs, then its block is replaced by the truth
        return torch.tensor((truth + [0] * 16)[len(tokens):len(tokens) + bs - 1])

    out = {}
    for kind in ("hf", "fast"):
        eng = Engine(kind, target, drafter, block_size=16)
        eng.prepare(len(PROMPT) + 40)
        g = eng.dflash(PROMPT, 40, set())
        b = eng.target_generate(PROMPT, 40, set())
        e = eng.dflash(PROMPT, 40, eos, force=oracle)
        assert g.tokens == b.tokens == truth and len(e.accept_lengths) == 1 and e.tokens == truth[:first + 1]
        assert 0 < g.draft_prefill_s <= g.decode_s and g.decode_s_zlab == g.decode_s - g.draft_prefill_s
        assert b.draft_prefill_s == 0 and b.decode_s_zlab == b.decode_s
        out[kind] = (g.tokens, g.accept_lengths)
    assert out["hf"] == out["fast"]
    gap = eng.top2(PROMPT + truth[:3])
    assert gap["top2_ids"][0] == truth[3] and gap["top2_gap"] >= 0


def test_fast_engine_grows_its_caches_outside_the_timed_region():
    target = tiny_target(seed=2)
    eng = Engine("fast", target, _drafter(target), block_size=4, max_len=16)
    eng.prepare(16)
    assert eng.captures == 1 and not eng.graphs                    # CPU: the steps run directly, no graphs
    eng.prepare(300, headroom=100)
    assert eng.captures == 2 and eng.dec.L >= 400 and eng.capture_s > 0
    eng.prepare(350)
    assert eng.captures == 2                                       # the headroom covers it
    assert eng.dflash(PROMPT, 40, set()).tokens == target_generate(target, PROMPT, 40, set()).tokens


def test_first_difference_and_both_clocks_in_the_summary():
    assert metrics.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert metrics.first_difference([1, 2], [1, 2, 3]) == 2
    recs = [{"n_tokens": 10, "accept_lengths": [4, 3, 2], "prefill_s": 0.5, "decode_s": 1.0, "draft_prefill_s": 0.2,
             "decode_s_zlab": 0.8, "lossless": False,
             "baseline": {"n_tokens": 10, "prefill_s": 0.5, "decode_s": 2.7, "decode_s_zlab": 2.7}}]
    s = metrics.summarize(recs, 4)
    assert s["speedup_decode_zlab"] == pytest.approx((2.7 / 10) / (0.8 / 10))
    assert s["speedup_decode_only"] == pytest.approx((2.7 / 9) / (1.0 / 9)) and s["diverged"] == 1
    old = [{k: v for k, v in recs[0].items() if k not in ("draft_prefill_s", "decode_s_zlab")}]
    assert "speedup_decode_zlab" not in metrics.summarize(old, 4)     # records without z-lab's clock
    a = [{"prompt_id": "1", "turn": 0, "accept_lengths": [2, 1], "tokens": [1, 2, 3]},
         {"prompt_id": "2", "turn": 0, "accept_lengths": [1], "tokens": [4]}]
    b = [{"prompt_id": "1", "turn": 0, "accept_lengths": [1, 1, 1], "tokens": [1, 2, 5]},
         {"prompt_id": "3", "turn": 0, "accept_lengths": [], "tokens": []}]
    c = metrics.compare(a, b)
    assert (c["matched"], c["only_a"], c["only_b"], c["equal_outputs"], c["compared"]) == (1, 1, 1, 0, 1)
    assert c["rows"] == [{"prompt_id": "1", "turn": 0, "tau_a": 1.5, "tau_b": 1.0, "compared": True,
                          "first_difference": 2}]


# ---------------------------------------------------------------------------------------------- bench stage


def _bench_config(repo: Path, engine: str, max_new: int = 48) -> dict:
    bc = dict(load_phase("smoke", repo / "configs" / "phases").runs["main"]["bench"])
    bc.update(engine=engine, max_new_tokens=max_new, device="cpu", dtype="float32")
    if engine != "fast":
        bc.pop("fast")
    return bc


def _smoke_dirs(repo: Path) -> tuple[Path, Path]:
    links = repo / "results" / "phases" / "smoke" / "main"
    return (links / "target").resolve(), (links / "convert").resolve()


def _mt_bench_file(directory: Path) -> Path:
    path = directory / "question.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MT_BENCH))
    return path


def run_baseline(tmp: Path, config: dict, target: Path) -> Path:
    """The baseline stage of a bench config (the target alone on its dataset), into tmp/baseline."""
    out = tmp / "baseline"
    out.mkdir(parents=True)
    cfg = {"bench": {k: v for k, v in config["bench"].items() if k not in DRAFT_ONLY}, "dataset": config["dataset"]}
    baseline.run(runner.Context(cfg, out, {"target": target}, tmp, log=lambda *_: None))
    return out


def _run_bench(tmp: Path, config: dict, upstream: dict, run: dict | None = None) -> tuple[list[dict], dict, dict]:
    out = tmp / "out"
    out.mkdir(parents=True)
    if config["bench"]["baseline"]:
        upstream = {**upstream, "baseline": run_baseline(tmp, config, upstream["target"])}
    result = bench.run(runner.Context(config, out, upstream, tmp, log=lambda *_: None, run=run or {}))
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text()), result


def test_fast_and_hf_bench_commit_the_same_tokens_request_by_request(smoke_repo, tmp_path, capsys):
    """Synthetic prompts and two MT-Bench conversations (turn 2 sees the DFlash answer to turn 1), fp32, T=0."""
    target, convert = _smoke_dirs(smoke_repo)
    mt = _mt_bench_file(tmp_path)
    got = {}
    for engine in ("hf", "fast"):
        for ds in ({"name": "synthetic_math", "n": 4, "seed": 0}, {"name": "mt_bench", "n": 2, "seed": 0,
                                                                    "path": str(mt)}):
            cfg = {"bench": _bench_config(smoke_repo, engine), "dataset": ds}
            records, summary, _ = _run_bench(tmp_path / engine / ds["name"], cfg, {"target": target,
                                                                                    "convert": convert})
            assert summary["backend"] == engine and summary["lossless"] is True and summary["diverged"] == 0
            assert summary["warmup_s"] > 0 and summary["cuda_graphs"] is False
            assert summary["speedup_decode_zlab"] > 0 and summary["speedup_decode_only"] > 0
            for r in records:
                assert r["tokens"] == r["baseline"]["tokens"] and len(r["tokens"]) == r["n_tokens"]
                assert r["decode_s_zlab"] == pytest.approx(r["decode_s"] - r["draft_prefill_s"])
                assert "mismatch" not in r
            got[engine, ds["name"]] = records
    for name in ("synthetic_math", "mt_bench"):
        hf, fast = got["hf", name], got["fast", name]
        assert [(r["prompt_id"], r["turn"], r["tokens"], r["accept_lengths"]) for r in hf] == \
               [(r["prompt_id"], r["turn"], r["tokens"], r["accept_lengths"]) for r in fast]
    mt_records = got["fast", "mt_bench"]
    assert [(r["prompt_id"], r["turn"]) for r in mt_records] == [("901", 0), ("901", 1), ("902", 0), ("902", 1)]
    assert mt_records[1]["prompt_tokens"] > mt_records[0]["prompt_tokens"] + 4             # the history is kept
    assert any(max(r["accept_lengths"], default=1) > 1 for recs in got.values() for r in recs)   # trained drafter
    assert any(r["n_tokens"] < 48 for recs in got.values() for r in recs)              # stopped at EOS
    a, b = (tmp_path / e / "mt_bench" / "out" for e in ("hf", "fast"))
    assert cli.main(["compare", str(a), str(b)]) == 0
    assert "equal outputs 4/4" in capsys.readouterr().out
    sampled = {}
    for engine in ("hf", "fast"):                   # T=1, seeded: the same draws, so the same tokens
        cfg = {"bench": {**_bench_config(smoke_repo, engine, 24), "temperature": 1.0},
               "dataset": {"name": "synthetic_code", "n": 2, "seed": 0}}
        records, summary, _ = _run_bench(tmp_path / "t1" / engine, cfg, {"target": target, "convert": convert})
        assert all("lossless" not in r and "mismatch" not in r for r in records) and "diverged" not in summary
        sampled[engine] = [(r["tokens"], r["baseline"]["tokens"]) for r in records]
    assert sampled["hf"] == sampled["fast"]


def test_a_lossless_failure_is_located_with_the_target_top2_gap():
    rec, calls = {}, []

    def top2(ids):
        calls.append(ids)
        return {"top2_ids": [7, 9], "top2_gap": 0.0}

    bench.check_lossless(rec, [1, 2], [4, 5, 9, 3], [4, 5, 7, 3], top2)
    assert rec == {"lossless": False, "mismatch": {"position": 2, "dflash_token": 9, "baseline_token": 7,
                                                   "top2_ids": [7, 9], "top2_gap": 0.0}}
    assert calls == [[1, 2, 4, 5]]
    rec = {}
    bench.check_lossless(rec, [1], [4, 5], [4, 5], top2)
    assert rec == {"lossless": True}


# ---------------------------------------------------------------------------------------------- pretrained drafters


def zlab_layout(src: Path, dest: Path) -> Path:
    """A drafter directory laid out as z-lab publishes theirs, from a convert stage's output: the full HF Qwen3
    config with `auto_map` to the publisher's remote code, `block_size`, `num_target_layers` and `dflash_config`,
    bf16 weights under z-lab's names, the remote code file and a model card beside them."""
    ours = json.loads((src / "config.json").read_text())
    n = ours["num_hidden_layers"]
    config = {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "head_dim": ours["head_dim"], "hidden_size": ours["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": ours["intermediate_size"], "max_position_embeddings": 40960, "max_window_layers": n,
        "num_attention_heads": ours["num_attention_heads"], "num_hidden_layers": n,
        "num_key_value_heads": ours["num_key_value_heads"], "rms_norm_eps": ours["rms_norm_eps"],
        "rope_scaling": None, "rope_theta": ours["rope_theta"], "sliding_window": None, "use_sliding_window": False,
        "layer_types": ["full_attention"] * n, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1", "use_cache": True, "vocab_size": ours["vocab_size"],
        "block_size": ours["block_size"], "num_target_layers": ours["num_target_layers"],
        "dflash_config": {"mask_token_id": ours["dflash_config"]["mask_token_id"],
                          "target_layer_ids": ours["dflash_config"]["target_layer_ids"]},
    }
    dest.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / "model.safetensors").items()},
              str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    (dest / "dflash.py").write_text("# the publisher's modelling code for trust_remote_code; not read here\n")
    (dest / "README.md").write_text("---\nlibrary_name: transformers\n---\n# tiny DFlash drafter\n")
    return dest


def test_zlab_config_format_and_clear_errors(tmp_path):
    cfg = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 64, "num_target_layers": 6, "rope_theta": 1e4,
           "dflash_config": {"mask_token_id": 63}, "block_size": 8}
    c = DrafterConfig.from_hf(cfg, "d/config.json")
    assert c.target_layer_ids == [1, 3] and c.head_dim == 8 and c.block_size == 8 and c.rope_theta == 1e4
    with pytest.raises(DataError, match=r"d/config.json: dflash_config.mask_token_id: missing"):
        DrafterConfig.from_hf({**cfg, "dflash_config": {}}, "d/config.json")
    with pytest.raises(DataError, match=r"d/config.json: layer_types: sliding"):
        DrafterConfig.from_hf({**cfg, "layer_types": ["sliding_attention"] * 2}, "d/config.json")
    with pytest.raises(DataError, match=r"d/config.json: rope_scaling: RoPE type 'yarn' is not supported"):
        DrafterConfig.from_hf({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "d/config.json")
    with pytest.raises(DataError, match=r"d/config.json: num_target_layers: missing"):
        DrafterConfig.from_hf({k: v for k, v in cfg.items() if k != "num_target_layers"}, "d/config.json")
    with pytest.raises(DataError, match=r"hidden_size: 32, the target's is 48"):
        c.check_target(tiny_target(hidden=48).config, "d/config.json")
    target = tiny_target()
    d = _drafter(target)
    d.save(tmp_path / "bad", "float32")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(DataError, match=r"bad/model.safetensors: the weights do not match .*bad/config.json"):
        DFlashDrafter.load(tmp_path / "bad")


def test_pretrained_values_and_keys_offline(tmp_path):
    assert pretrained.parse("z-lab/Qwen3-8B-DFlash-b16@abc1") == pretrained.Pretrained(
        "z-lab/Qwen3-8B-DFlash-b16@abc1", hub_id="z-lab/Qwen3-8B-DFlash-b16", revision="abc1")
    assert pretrained.parse("../drafters/x").path == Path("../drafters/x")
    for bad in ("drafters", "a/b/c", "a/b@"):
        with pytest.raises(ValueError, match="neither a local directory"):
            pretrained.parse(bad)
    assert pretrained.identity("z-lab/Qwen3-8B-DFlash-b16") == {"hub_id": "z-lab/Qwen3-8B-DFlash-b16",
                                                                "revision": None}
    target = tiny_target()
    _drafter(target).save(tmp_path / "d", "float32")
    ident = pretrained.identity(str(tmp_path / "d"))
    assert set(ident["files"]) == {"config.json", "model.safetensors"}
    phases = tmp_path / "phases"
    phases.mkdir()
    (phases / "p.yaml").write_text(json.dumps({
        "defaults": {"target": {"kind": "synthetic"}}, "datasets": [{"name": "synthetic_math", "n": 2}],
        "runs": {"trained": {}, "local": {"drafter": {"pretrained": str(tmp_path / "d")}},
                 "hub": {"drafter": {"pretrained": "z-lab/Qwen3-8B-DFlash-b16"}}}}))
    reg = build({"p": load_phase("p", phases)})
    plans = reg.plans["p"]
    assert set(plans["trained"].keys) == {"target", "prepare", "regenerate", "tokenize", "train", "convert"}
    for run in ("local", "hub"):
        assert set(plans[run].keys) == {"target"} and plans[run].keys["target"] == plans["trained"].keys["target"]
        inst = reg.get("bench", plans[run].bench["synthetic_math"])
        assert set(inst.upstream) == {"target", "baseline"} and inst.upstream["target"] == plans[run].keys["target"]
    assert reg.get("bench", plans["local"].bench["synthetic_math"]).config["drafter"] == ident
    (phases / "q.yaml").write_text(json.dumps({"datasets": [{"name": "synthetic_math"}],
                                               "defaults": {"drafter": {"pretrained": str(tmp_path / "none")}}}))
    with pytest.raises(ConfigError, match=r"runs.main.drafter.pretrained: .*none has no config.json"):
        load_phase("q", phases)


def test_a_hub_drafter_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"drafter.pretrained z-lab/none@main: cannot fetch it"):
        pretrained_dir("z-lab/none@main")


def _phase(repo: Path, runs: dict) -> None:
    """A phase `mix` beside smoke with the same defaults and datasets (so its trained run is smoke's) plus runs."""
    phases = repo / "configs" / "phases"
    doc = {"extends": "smoke", "description": "smoke's run and published drafters", "runs": {"main": {}, **runs}}
    (phases / "mix.yaml").write_text(json.dumps(doc))


def test_pretrained_runs_bench_report_and_audit(smoke_repo, tmp_path, monkeypatch):
    """A convert-stage directory (local path) and a directory in z-lab's published layout (a hub id, found in a local
    HF cache offline) as runs beside the trained one: target and bench only, lossless at fp32, one report with
    training rows for the trained run only, audited clean."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "repo"
    shutil.copytree(smoke_repo, repo, symlinks=True,
                    ignore=shutil.ignore_patterns(".snakemake", "logs", "checkpoints", "reports"))
    _, convert = _smoke_dirs(repo)
    cache = tmp_path / "hub"                        # the HF cache layout: models--owner--name/{refs,snapshots}
    snap = zlab_layout(convert, cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(repo)
    quick = {"engine": "fast", "max_new_tokens": 24, "device": "cpu"}
    _phase(repo, {"converted": {"drafter": {"pretrained": str(convert)}, "bench": quick},
                  "hub": {"drafter": {"pretrained": HUB_ID}, "bench": quick}})
    reg = build({"mix": load_phase("mix", repo / "configs" / "phases")}, ResultsTree(repo / "results"))
    plans = reg.plans["mix"]
    for run in ("converted", "hub"):
        assert set(plans[run].keys) == {"target"}
        assert plans[run].baseline == plans["converted"].baseline != plans["main"].baseline    # shared, own settings
        for key in plans[run].baseline.values():
            if not (reg.get("baseline", key).dir / "provenance.json").is_file():
                runner.run(reg, "baseline", key)
        for engine, keys in reg.engine_groups("bench").items():
            if set(keys) <= set(plans[run].bench.values()):
                runner.run_many(reg, "bench", keys, engine)
    assert plans["main"].bench == build({"smoke": load_phase("smoke", repo / "configs" / "phases")},
                                        ResultsTree(repo / "results")).plans["smoke"]["main"].bench
    prov = json.loads((repo / "results" / "bench" / plans["hub"].bench["synthetic_math"] / "provenance.json")
                      .read_text())
    assert prov["summary"]["drafter"]["commit"] == COMMIT
    assert f"hub:{HUB_ID}@{COMMIT}/model.safetensors" in prov["inputs"]
    benches = {run: repo / "results" / "bench" / plans[run].bench["synthetic_math"] for run in ("converted", "hub")}
    for d in benches.values():
        summary = report.bench_summary(d)
        assert summary["lossless"] is True and summary["backend"] == "fast"
    same = metrics.compare(*(read_jsonl(d / "records.jsonl") for d in benches.values()))
    assert same["equal_outputs"] == same["matched"] == 12          # both commit the target's greedy tokens
    runner.run(reg, "report", reg.report_key("mix"))
    out = repo / "results" / "reports" / "mix"
    training = (out / "tables" / "training.csv").read_text().splitlines()
    assert len(training) == 2 and training[1].startswith("main,")
    speed = (out / "tables" / "speedup.csv").read_text()
    assert speed.splitlines()[0].startswith("run,dataset,speedup_decode_zlab,")
    assert "`hub` = `z-lab/tiny-DFlash-b16`" in (out / "report.md").read_text()
    result = audit.audit(reg, "mix")
    assert result.ok, result.summary()


def test_committed_phases_name_the_released_drafter_and_plan_offline():
    for name in ("qwen3_8b", "paper"):
        ph = load_phase(name, ROOT / "configs" / "phases")
        assert ph.runs["zlab"]["drafter"]["pretrained"] == "z-lab/Qwen3-8B-DFlash-b16"
        assert ph.runs["main"]["bench"]["engine"] == "fast"
    for name in ("phase_a", "phase_g"):
        assert list(load_phase(name, ROOT / "configs" / "phases").runs) == ["main"]
    plans = build({name: load_phase(name, ROOT / "configs" / "phases") for name in ("qwen3_8b", "paper")}).plans
    assert set(plans["paper"]["zlab"].keys) == {"target"}                    # no hub call: id and revision only
    assert plans["paper"]["zlab"].bench == plans["qwen3_8b"]["zlab"].bench   # one bench per dataset, shared
