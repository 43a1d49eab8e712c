"""Stage keys: a change reruns exactly its subtree; equal inputs share a stage."""

import copy

from dflash.plan.config import load_phase
from dflash.plan.keys import build, stage_key


def _keys(phase, with_baseline: bool = False):
    reg = build({phase.name: phase})
    plan = reg.plans[phase.name]["main"]
    base = {f"baseline/{d}": k for d, k in plan.baseline.items()} if with_baseline else {}
    return {**plan.keys, **{f"bench/{d}": k for d, k in plan.bench.items()}, **base}


def _changed(a, b):
    return sorted(k for k in a if a[k] != b[k])


def test_key_is_stable_and_short():
    k = stage_key("train", {"train": {"lr": 1e-4}}, {"tokenize": "abc"})
    assert k == stage_key("train", {"train": {"lr": 0.0001}}, {"tokenize": "abc"})
    assert len(k) == 12 and int(k, 16) >= 0
    assert k != stage_key("train", {"train": {"lr": 2e-4}}, {"tokenize": "abc"})


def test_train_change_reruns_train_convert_bench_only():
    base = load_phase("smoke")
    changed = copy.deepcopy(base)
    changed.runs["main"]["train"]["lr"] = 1.0e-3
    diff = _changed(_keys(base), _keys(changed))
    assert diff == ["bench/synthetic_chat", "bench/synthetic_code", "bench/synthetic_math", "convert", "train"]


def test_bench_change_reruns_bench_only():
    base = load_phase("smoke")
    changed = copy.deepcopy(base)
    changed.runs["main"]["bench"]["max_new_tokens"] = 32
    assert _changed(_keys(base), _keys(changed)) == ["bench/synthetic_chat", "bench/synthetic_code",
                                                     "bench/synthetic_math"]


def test_baseline_keys_hold_the_target_dataset_and_decoding_settings_only():
    """A drafter change (train, block size) keeps the baselines; a decoding change that the target-only decode
    sees (max new tokens, dtype, engine) replaces them and the benches; `bench.baseline: false` plans none."""
    base = load_phase("smoke")
    sets = ["synthetic_chat", "synthetic_code", "synthetic_math"]
    for section, field, value in (("train", "lr", 1.0e-3), ("bench", "block_size", 8), ("drafter", "num_layers", 1)):
        changed = copy.deepcopy(base)
        changed.runs["main"][section][field] = value
        assert not any(k.startswith("baseline/") for k in _changed(_keys(base, True), _keys(changed, True)))
    for field, value in (("max_new_tokens", 32), ("dtype", "bfloat16"), ("engine", "fast"), ("seed", 1)):
        changed = copy.deepcopy(base)
        changed.runs["main"]["bench"][field] = value
        diff = _changed(_keys(base, True), _keys(changed, True))
        assert diff == [f"baseline/{d}" for d in sets] + [f"bench/{d}" for d in sets], field
    off = copy.deepcopy(base)
    off.runs["main"]["bench"]["baseline"] = False
    reg = build({"smoke": off})
    assert reg.plans["smoke"]["main"].baseline == {} and not reg.engine_groups("baseline")
    assert all("baseline" not in reg.get("bench", k).upstream for k in reg.plans["smoke"]["main"].bench.values())


def test_data_stages_shared_between_runs_and_phases():
    base = load_phase("smoke")
    other = copy.deepcopy(base)
    other.name = "other"
    other.runs = {"a": copy.deepcopy(base.runs["main"]), "b": copy.deepcopy(base.runs["main"])}
    other.runs["b"]["train"]["gamma"] = 3.0
    reg = build({"smoke": base, "other": other})
    a, b, s = reg.plans["other"]["a"], reg.plans["other"]["b"], reg.plans["smoke"]["main"]
    for stage in ("target", "prepare", "regenerate", "tokenize"):
        assert a.keys[stage] == b.keys[stage] == s.keys[stage]
    assert a.keys["train"] == s.keys["train"] != b.keys["train"]
    assert sorted(reg.get("train", a.keys["train"]).users) == [("other", "a"), ("smoke", "main")]


def test_original_responses_skip_regenerate():
    base = load_phase("smoke")
    orig = copy.deepcopy(base)
    orig.runs["main"]["regenerate"]["enabled"] = False
    plan = build({"x": orig}).plans["x"]["main"]
    assert "regenerate" not in plan.keys
    reg = build({"x": orig})
    assert reg.get("tokenize", plan.keys["tokenize"]).upstream == {"prepare": plan.keys["prepare"],
                                                                   "target": plan.keys["target"]}


def test_scheduler_resources_are_not_part_of_keys_but_training_ranks_are():
    base = load_phase("smoke")
    changed = copy.deepcopy(base)
    changed.runs["main"]["resources"] = {"train": {"mem_mb": 64000, "runtime": 600}, "bench": {"gpus": 1}}
    assert _keys(base) == _keys(changed)
    eight = copy.deepcopy(base)
    eight.runs["main"]["resources"] = {"train": {"gpus": 8, "inference_gpus": 2}}   # 6 ranks: another global batch
    diff = _changed(_keys(base), _keys(eight))
    assert diff == ["bench/synthetic_chat", "bench/synthetic_code", "bench/synthetic_math", "convert", "train"]
    reg = build({"smoke": eight})
    assert reg.get("train", reg.plans["smoke"]["main"].keys["train"]).config["data_parallel"] == 6
