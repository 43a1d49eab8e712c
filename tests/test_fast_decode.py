"""Fast path (static caches, fixed-shape steps): same tokens as the eager HF engine at T=0 on CPU, fp32.

Covers greedy target-only, DFlash with the random drafter, an oracle proposer (tau = block size), a wrong one
(tau = 1), forced acceptance patterns with the real drafter running underneath, EOS inside a block, seeded
sampling, cache contents against HF's DynamicCache / the eager drafter cache, stale cache entries being invisible,
and the decode_speed benchmark's --tiny mode."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dflash.decoding.fast import (
    FastDecoder,
    clear_decoders,
    fast_dflash_generate,
    fast_target_generate,
    get_decoder,
)
from dflash.decoding.hf import DrafterProposer, dflash_generate, target_generate
from dflash.modeling.drafter import DFlashDrafter, DrafterConfig
from test_model import _drafter, tiny_target

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 3, 42, 8, 9, 11]


pytestmark = pytest.mark.usefixtures("one_thread")


def _pattern_proposer(truth, pattern, vocab):
    """Proposes truth[n:n+k] and then wrong tokens, k cycling through `pattern`: accept length = k + 1 exactly."""
    step = [0]

    def propose(tokens, start, pending, bs):
        n, k = len(tokens), pattern[step[0] % len(pattern)]
        step[0] += 1
        want = truth[n:n + bs - 1]
        return torch.tensor(want[:k] + [(t + 1) % vocab for t in want[k:]])

    return propose


def _expected_accepts(pattern, n_new):
    """z-lab's loop: a step runs while at most n_new tokens are committed."""
    acc, n, i = [], 1, 0
    while n <= n_new:
        acc.append(pattern[i % len(pattern)] + 1)
        n += acc[-1]
        i += 1
    return acc


def test_target_only_greedy_equal():
    for seed in (1, 2):
        target = tiny_target(seed=seed)
        base = target_generate(target, PROMPT, 40, eos=set())
        fast = fast_target_generate(target, PROMPT, 40, eos=set())
        assert fast.tokens == base.tokens and len(fast.tokens) == 40


@pytest.mark.parametrize("bs", [4, 8])
def test_dflash_random_drafter_equal(bs):
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    base = target_generate(target, PROMPT, 40, eos=set())
    eager = dflash_generate(target, drafter, PROMPT, 40, eos=set(), block_size=bs)
    fast = fast_dflash_generate(target, drafter, PROMPT, 40, eos=set(), block_size=bs)
    assert fast.tokens == eager.tokens == base.tokens
    assert fast.accept_lengths == eager.accept_lengths


def test_oracle_gives_block_size_and_wrong_gives_one():
    target = tiny_target(seed=2)
    drafter = _drafter(target)
    truth = target_generate(target, PROMPT, 64, eos=set()).tokens

    def oracle(tokens, start, pending, bs):
        return torch.tensor(truth[len(tokens):len(tokens) + bs - 1])

    def wrong(tokens, start, pending, bs):
        return torch.tensor([(t + 1) % 64 for t in (truth + [0] * bs)[len(tokens):len(tokens) + bs - 1]])

    spec = fast_dflash_generate(target, drafter, PROMPT, 49, eos=set(), block_size=4, propose=oracle)
    assert spec.tokens == truth[:49] and spec.accept_lengths == [4] * 13      # 1 + 12 x 4 = 49: one more step
    spec = fast_dflash_generate(target, drafter, PROMPT, 30, eos=set(), block_size=4, propose=wrong)
    assert spec.tokens == truth[:30] and set(spec.accept_lengths) == {1}


def test_forced_pattern_equal_to_eager_and_to_target():
    """Every accept length 1..B occurs; both engines commit the target's greedy tokens with the expected taus."""
    target = tiny_target(seed=3)
    drafter = _drafter(target)
    bs, n_new, pattern = 8, 120, [7, 0, 3, 6, 1, 5, 2, 4, 0, 7]
    truth = target_generate(target, PROMPT, n_new + bs, eos=set()).tokens
    expected = _expected_accepts(pattern, n_new)
    eager = dflash_generate(target, drafter, PROMPT, n_new, set(), block_size=bs,
                            propose=_pattern_proposer(truth, pattern, 64))
    fast = fast_dflash_generate(target, drafter, PROMPT, n_new, set(), block_size=bs,
                                propose=_pattern_proposer(truth, pattern, 64))
    assert eager.tokens == fast.tokens == truth[:n_new]
    assert eager.accept_lengths == fast.accept_lengths == expected


def _small_vocab_pair(vocab=5, seed=3):
    target = tiny_target(vocab=vocab, seed=seed)
    cfg = DrafterConfig.for_target(target.config, {"num_layers": 2, "num_target_layers": None,
                                                   "target_layer_ids": None, "block_size": 4,
                                                   "intermediate_size": None}, mask_token_id=vocab - 1)
    drafter = DFlashDrafter(cfg)
    drafter.init_weights(1)
    return target, drafter


def test_drafter_under_forced_acceptance_same_drafts_and_caches():
    """The real drafter runs every step (its cache bookkeeping sees every accept length), but the verified block is
    forced to a pattern; its raw drafts and final caches must equal the eager engine's."""
    target, drafter = _small_vocab_pair(vocab=64)
    bs, n_new, pattern = 8, 80, [7, 0, 3, 6, 1, 5, 2, 4]
    truth = target_generate(target, PROMPT, n_new + bs, eos=set()).tokens

    prop, forced, eager_drafts = DrafterProposer(drafter, target), _pattern_proposer(truth, pattern, 64), []

    def eager_propose(tokens, start, pending, bs_):
        eager_drafts.append(prop(tokens, start, pending, bs_).tolist())
        return forced(tokens, start, pending, bs_)

    eager = dflash_generate(target, drafter, PROMPT, n_new, set(), block_size=bs, propose=eager_propose)

    forced2, fast_drafts = _pattern_proposer(truth, pattern, 64), []

    def force(tokens, start, drafts, bs_):
        fast_drafts.append(drafts.tolist())
        return forced2(tokens, start, None, bs_)

    dec = FastDecoder(target, drafter, max_len=128, block_size=bs)
    fast = dec.dflash_generate(PROMPT, n_new, set(), force=force)
    assert fast.tokens == eager.tokens == truth[:n_new]
    assert fast.accept_lengths == eager.accept_lengths == _expected_accepts(pattern, n_new)
    assert fast_drafts == eager_drafts
    # drafter cache: context K/V of positions [0, last start) as in the eager list cache
    s = prop.cached
    for i, (k, v) in enumerate(prop.cache):
        assert torch.allclose(dec.dk[i][:, :s], k[0], atol=1e-5) and torch.allclose(dec.dv[i][:, :s], v[0], atol=1e-5)
    # target cache: positions before the last committed token equal HF's cache after a prefill of the committed text
    from transformers import DynamicCache
    committed = PROMPT + eager.tokens[:-1]
    cache = DynamicCache()
    target(input_ids=torch.tensor([committed]), past_key_values=cache, use_cache=True)
    n = len(committed)
    for i, layer in enumerate(cache.layers):
        assert torch.allclose(dec.tk[i][:, :n], layer.keys[0], atol=1e-5)
        assert torch.allclose(dec.tv[i][:, :n], layer.values[0], atol=1e-5)


def test_small_vocab_real_drafter_varied_acceptance():
    """A 5-token vocabulary makes the random drafter right often enough for several accept lengths."""
    target, drafter = _small_vocab_pair()
    for bs in (4, 8):
        eager = dflash_generate(target, drafter, [1, 2, 3, 0, 4, 2, 1], 60, set(), block_size=bs)
        fast = fast_dflash_generate(target, drafter, [1, 2, 3, 0, 4, 2, 1], 60, set(), block_size=bs)
        assert fast.tokens == eager.tokens and fast.accept_lengths == eager.accept_lengths
        assert max(fast.accept_lengths) > 1


def test_eos_inside_block_stops():
    target = tiny_target(seed=1)
    truth = target_generate(target, PROMPT, 40, eos=set()).tokens
    first = next(i for i in range(1, 15) if truth[i] not in truth[:i])
    eos = {truth[first]}

    def oracle(tokens, start, pending, bs):
        return torch.tensor((truth + [0] * 16)[len(tokens):len(tokens) + bs - 1])

    drafter = _drafter(target)
    spec = fast_dflash_generate(target, drafter, PROMPT, 40, eos=eos, block_size=16, propose=oracle)
    eager = dflash_generate(target, drafter, PROMPT, 40, eos=eos, block_size=16, propose=oracle)
    base = fast_target_generate(target, PROMPT, 40, eos=eos)
    assert spec.tokens == eager.tokens == base.tokens == truth[:first + 1] and len(spec.accept_lengths) == 1
    # EOS as the very first token: the output is that token; z-lab's loop still runs one step
    eos0 = {truth[0]}
    assert fast_target_generate(target, PROMPT, 40, eos=eos0).tokens == [truth[0]]
    first_eos = fast_dflash_generate(target, drafter, PROMPT, 40, eos=eos0, block_size=4)
    assert first_eos.tokens == [truth[0]] and len(first_eos.accept_lengths) == 1


def test_sampling_matches_eager_seeded():
    target = tiny_target(seed=4)
    drafter = _drafter(target)
    g = [torch.Generator().manual_seed(0) for _ in range(4)]
    a = dflash_generate(target, drafter, PROMPT, 24, set(), temperature=1.0, block_size=4, generator=g[0])
    b = fast_dflash_generate(target, drafter, PROMPT, 24, set(), temperature=1.0, block_size=4, generator=g[1])
    assert a.tokens == b.tokens and a.accept_lengths == b.accept_lengths and len(b.tokens) == 24
    a = target_generate(target, PROMPT, 24, set(), temperature=1.0, generator=g[2])
    b = fast_target_generate(target, PROMPT, 24, set(), temperature=1.0, generator=g[3])
    assert a.tokens == b.tokens


def test_stale_entries_invisible_and_decoder_reuse():
    """Garbage in every cache slot before a generation changes nothing (unwritten or rejected entries are masked);
    a decoder reused across prompts gives what a fresh one gives."""
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    other = [9, 1, 33, 2]
    fresh = [FastDecoder(target, drafter, max_len=64, block_size=4).dflash_generate(p, 40, set())
             for p in (PROMPT, other)]
    dec = FastDecoder(target, drafter, max_len=64, block_size=4)
    g = torch.Generator().manual_seed(0)
    for t in (dec.tk, dec.tv, dec.dk, dec.dv):
        t.copy_(torch.randn(t.shape, generator=g) * 100)
    for p, ref in zip((PROMPT, other), fresh, strict=True):
        out = dec.dflash_generate(p, 40, set())
        assert out.tokens == ref.tokens and out.accept_lengths == ref.accept_lengths


def test_prefill_and_verify_logits_match_hf():
    from transformers import DynamicCache
    target = tiny_target(seed=5)
    dec = FastDecoder(target, _drafter(target), max_len=64, block_size=4)
    cache = DynamicCache()
    ref = target(input_ids=torch.tensor([PROMPT]), past_key_values=cache, use_cache=True, output_hidden_states=True)
    logits, feats = dec.prefill(PROMPT)
    assert torch.allclose(logits[0, -1], ref.logits[0, -1], atol=1e-5)
    assert torch.allclose(feats, torch.cat([ref.hidden_states[i + 1] for i in dec.feat_ids], -1), atol=1e-5)
    block = [3, 60, 2, 7]
    ref2 = target(input_ids=torch.tensor([block]), past_key_values=cache, use_cache=True)
    assert torch.allclose(dec.verify(block, len(PROMPT)), ref2.logits[0], atol=1e-5)


def test_decoder_cache_grows_and_is_dropped():
    clear_decoders()
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    dec = get_decoder(target, drafter, 4, max_len=16)
    small = dec.L
    assert get_decoder(target, drafter, 4, max_len=500) is dec and dec.L > small >= 16
    out = fast_dflash_generate(target, drafter, PROMPT, 40, set(), block_size=4)
    assert out.tokens == target_generate(target, PROMPT, 40, set()).tokens
    clear_decoders()


def test_compiled_pieces_trace_as_full_graphs():
    """The torch.compile variant: every per-layer piece traces without graph breaks (dynamo only, no codegen)."""
    torch._dynamo.reset()
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    dec = FastDecoder(target, drafter, max_len=64, block_size=4, compile={"backend": "eager"})
    out = dec.dflash_generate(PROMPT, 24, set())
    assert out.tokens == dflash_generate(target, drafter, PROMPT, 24, set(), block_size=4).tokens
    tdec = FastDecoder(target, None, max_len=64, compile={"backend": "eager"})
    assert tdec.target_generate(PROMPT, 24, set()).tokens == target_generate(target, PROMPT, 24, set()).tokens
    torch._dynamo.reset()


def test_unsupported_target_is_refused():
    target = tiny_target()
    target.config.hidden_act = "gelu"
    with pytest.raises(NotImplementedError):
        FastDecoder(target)


def test_decode_speed_tiny_runs(tmp_path, capsys):
    """benchmarks/decode_speed.py --tiny, in-process (same code as the script; saves a second torch import)."""
    spec = importlib.util.spec_from_file_location("decode_speed", ROOT / "benchmarks" / "decode_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        rc = mod.main(["--tiny", "--new-tokens", "40", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["shapes"]["tiny"] and res["new_tokens"] == 40
    assert {v["name"] for v in res["variants"]} == {"eager", "fast"}
    for v in res["variants"]:
        assert v["target_ms_per_token"] > 0 and v["dflash_ms_per_step"] > 0 and v["forced_tau"] > 1
    assert all(c["ok"] for c in res["checks"] if not c.get("informational"))
    assert any(c["name"].startswith("strict/fast/") for c in res["checks"])
    assert "RESULT: PASS" in printed


def test_bf16_drift_script_finds_the_fast_prefill_equal_to_hf_bit_for_bit(tmp_path):
    """benchmarks/bf16_drift.py on a small bf16 Qwen3 (CPU): every op of layer 0 and every layer's hidden state of
    the fast prefill equal HF's sdpa forward bit for bit, while HF's own eager attention differs (issue 15's 3%)."""
    spec = importlib.util.spec_from_file_location("bf16_drift", ROOT / "benchmarks" / "bf16_drift.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "drift.json"
    assert mod.main(["--layers", "3", "--hidden", "128", "--inter", "256", "--heads", "4", "--kv", "2",
                     "--head-dim", "32", "--vocab", "512", "--prompt", "48", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(d["equal"] for d in res["layer0_ops"].values())
    assert all(r["fast_equal"] and r["fast_vs_hf_sdpa"] == 0 for r in res["per_layer"])
    assert all(r["hf_eager_vs_hf_sdpa"] > 0 for r in res["per_layer"])
