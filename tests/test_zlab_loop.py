"""The decode loops stop as z-lab's `dflash_generate` (dflash/model.py): against a transcript of that loop,
re-implemented here from its source (output buffer, `while start < max_length`, stop tokens checked after each step,
output cut at min(start + 1, max_length) and at the first stop token), on the small test models.

The cases that differ from a loop stopping at max_new_tokens committed: an exact landing on the cap (one more step),
and a first token that is EOS (one step). The baseline is z-lab's loop at block size 1."""

import pytest
import torch
from test_fast_decode import PROMPT, _pattern_proposer, _small_vocab_pair
from transformers import DynamicCache

from dflash.decoding.fast import FastDecoder
from dflash.decoding.hf import DrafterProposer, crop_cache, dflash_generate, target_generate
from test_model import _drafter, tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def zlab_transcript(target, prompt, max_new_tokens, stop_token_ids, block_size, draft=None, layer_ids=(),
                    mask_token_id=0):
    """z-lab's dflash_generate at T=0: (output tokens, acceptance_lengths, target forwards after prefill).
    `draft(committed, start, target_hidden, block_size) -> (B-1,)` fills the block's masks."""
    num_input = len(prompt)
    max_length = num_input + max_new_tokens
    output_ids = torch.full((1, max_length + block_size), mask_token_id, dtype=torch.long)
    position_ids = torch.arange(output_ids.shape[1])[None]
    cache = DynamicCache()
    input_ids = torch.tensor([prompt])
    out = target(input_ids, position_ids=position_ids[:, :num_input], past_key_values=cache, use_cache=True,
                 logits_to_keep=1, output_hidden_states=block_size > 1)
    output_ids[:, :num_input] = input_ids
    output_ids[:, num_input:num_input + 1] = out.logits.argmax(-1)
    hidden = torch.cat([out.hidden_states[i + 1] for i in layer_ids], -1) if block_size > 1 else None
    acceptance_lengths, start, forwards = [], num_input, 0
    while start < max_length:
        block = output_ids[:, start:start + block_size].clone()
        if block_size > 1:
            block[:, 1:] = draft(output_ids[0, num_input:start + 1].tolist(), start, hidden, block_size)
        out = target(block, position_ids=position_ids[:, start:start + block_size], past_key_values=cache,
                     use_cache=True, output_hidden_states=block_size > 1)
        forwards += 1
        posterior = out.logits.argmax(-1)
        a = int((block[:, 1:] == posterior[:, :-1]).cumprod(dim=1).sum(dim=1)[0])
        output_ids[:, start:start + a + 1] = block[:, :a + 1]
        output_ids[:, start + a + 1] = posterior[:, a]
        start += a + 1
        crop_cache(cache, start)         # z-lab: past_key_values_target.crop(start) (keep `start` positions)
        acceptance_lengths.append(a + 1)
        if block_size > 1:
            hidden = torch.cat([out.hidden_states[i + 1] for i in layer_ids], -1)[:, :a + 1]
        if stop_token_ids and any(t in output_ids[:, num_input:] for t in stop_token_ids):
            break
    tokens = output_ids[0, num_input:min(start + 1, max_length)].tolist()
    for i, t in enumerate(tokens):
        if t in stop_token_ids:
            tokens = tokens[:i + 1]
            break
    return tokens, acceptance_lengths, forwards


def _engines(target, drafter, bs):
    fast = FastDecoder(target, drafter, max_len=96, block_size=bs)
    return {"hf": lambda *a, **k: dflash_generate(target, drafter, *a, block_size=bs, **k),
            "fast": lambda *a, **k: fast.dflash_generate(*a, **k)}


def test_real_drafter_every_cap_equals_zlab():
    """The random drafter on a 5-token vocabulary (several accept lengths): every max_new_tokens from 1 to 24, so
    some requests land exactly on the cap and some overshoot it."""
    target, drafter = _small_vocab_pair()
    bs, prompt = 4, [1, 2, 3, 0, 4, 2, 1]
    engines = _engines(target, drafter, bs)
    exact = 0
    for n_new in range(1, 25):
        prop = DrafterProposer(drafter, target)
        want = zlab_transcript(target, prompt, n_new, [], bs, lambda c, s, h, b, prop=prop: prop([c[-1]], s, h, b),
                               drafter.config.target_layer_ids, drafter.config.mask_token_id)
        exact += 1 + sum(want[1][:-1]) == n_new          # the last step ran with exactly n_new committed
        for name, run in engines.items():
            got = run(prompt, n_new, set())
            assert (got.tokens, got.accept_lengths) == want[:2], (name, n_new)
    assert exact >= 5


@pytest.mark.parametrize("bs", [4, 8])
def test_forced_patterns_and_stop_tokens_equal_zlab(bs):
    """Forced accept patterns (every accept length), caps 1..40, with and without a stop token."""
    target = tiny_target(seed=3)
    drafter = _drafter(target)
    truth = target_generate(target, PROMPT, 60, eos=set()).tokens
    pattern = [3, 0, 2, 1, 0, 3, 1]
    stop = next(t for i, t in enumerate(truth) if 10 < i and t not in truth[:i])
    engines = _engines(target, drafter, bs)
    for n_new in range(1, 41, 3):
        for eos in (set(), {stop}):
            pat = _pattern_proposer(truth, pattern, 64)
            want = zlab_transcript(target, PROMPT, n_new, sorted(eos), bs, lambda c, s, h, b, pat=pat: pat(c, s, h, b),
                                   drafter.config.target_layer_ids, drafter.config.mask_token_id)
            for name, run in engines.items():
                got = run(PROMPT, n_new, eos, propose=_pattern_proposer(truth, pattern, 64))
                assert (got.tokens, got.accept_lengths) == want[:2], (name, n_new, eos)


def test_first_token_eos_runs_one_step_as_zlab():
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    first = target_generate(target, PROMPT, 1, eos=set()).tokens[0]
    prop = DrafterProposer(drafter, target)
    want = zlab_transcript(target, PROMPT, 20, [first], 4, lambda c, s, h, b: prop([c[-1]], s, h, b),
                           drafter.config.target_layer_ids, drafter.config.mask_token_id)
    assert want[0] == [first] and len(want[1]) == 1
    for name, run in _engines(target, drafter, 4).items():
        got = run(PROMPT, 20, {first})
        assert (got.tokens, got.accept_lengths) == want[:2], name


def test_baseline_forwards_are_zlabs_block_size_1():
    """The target-only baseline runs as many target forwards as z-lab's loop at block size 1 (its baseline)."""
    target = tiny_target(seed=2)
    truth = target_generate(target, PROMPT, 30, eos=set()).tokens
    calls = [0]
    hook = target.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        for n_new, eos in ((1, set()), (12, set()), (12, {truth[0]}), (25, {truth[5]})):
            calls[0] = 0
            want = zlab_transcript(target, PROMPT, n_new, sorted(eos), 1)
            zlab_forwards = calls[0] - 1
            calls[0] = 0
            got = target_generate(target, PROMPT, n_new, eos)
            assert got.tokens == want[0] and calls[0] - 1 == zlab_forwards == want[2], (n_new, eos)
            fast = FastDecoder(target, None, max_len=64).target_generate(PROMPT, n_new, eos)
            assert fast.tokens == want[0]
    finally:
        hook.remove()
