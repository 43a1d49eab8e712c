"""HF engine: lossless at T=0, oracle drafter gives tau = block size, a wrong drafter gives tau = 1."""

import torch

from dflash.decoding.hf import dflash_generate, target_generate
from dflash.decoding.metrics import summarize
from test_model import _drafter, tiny_target

PROMPT = [5, 17, 3, 42, 8, 9, 11]


def test_lossless_greedy_and_crop():
    target = tiny_target(seed=1)
    drafter = _drafter(target)
    base = target_generate(target, PROMPT, 40, eos=set())
    spec = dflash_generate(target, drafter, PROMPT, 40, eos=set(), block_size=4)
    assert spec.tokens == base.tokens and len(spec.tokens) == 40
    assert sum(spec.accept_lengths) >= 40 - 1 and all(1 <= a <= 4 for a in spec.accept_lengths)


def test_oracle_drafter_gives_block_size():
    target = tiny_target(seed=2)
    drafter = _drafter(target)
    truth = target_generate(target, PROMPT, 64, eos=set()).tokens

    def oracle(tokens, start, pending, bs):
        n = len(tokens)
        return torch.tensor(truth[n:n + bs - 1])

    spec = dflash_generate(target, drafter, PROMPT, 49, eos=set(), block_size=4, propose=oracle)
    assert spec.tokens == truth[:49]
    assert spec.accept_lengths == [4] * 13      # 1 + 12 * 4 = 49 tokens, then z-lab's loop runs one more step
    assert summarize([{"accept_lengths": spec.accept_lengths, "n_tokens": 49}], 4)["tau_macro"] == 4.0


def test_wrong_drafter_gives_one_and_stays_lossless():
    target = tiny_target(seed=3)
    drafter = _drafter(target)
    truth = target_generate(target, PROMPT, 30, eos=set()).tokens

    def wrong(tokens, start, pending, bs):
        n = len(tokens)
        return torch.tensor([(t + 1) % 64 for t in (truth + [0] * bs)[n:n + bs - 1]])

    spec = dflash_generate(target, drafter, PROMPT, 30, eos=set(), block_size=4, propose=wrong)
    assert spec.tokens == truth and set(spec.accept_lengths) == {1}


def test_eos_inside_block_stops():
    target = tiny_target(seed=1)
    truth = target_generate(target, PROMPT, 40, eos=set()).tokens
    first = next(i for i in range(1, 15) if truth[i] not in truth[:i])    # an EOS in the middle of the first block
    eos = {truth[first]}

    def oracle(tokens, start, pending, bs):
        n = len(tokens)
        return torch.tensor((truth + [0] * 16)[n:n + bs - 1])

    spec = dflash_generate(target, _drafter(target), PROMPT, 40, eos=eos, block_size=16, propose=oracle)
    base = target_generate(target, PROMPT, 40, eos=eos)
    assert spec.tokens == base.tokens == truth[:first + 1] and len(spec.accept_lengths) == 1


def test_sampling_is_target_distribution_seeded():
    target = tiny_target(seed=4)
    drafter = _drafter(target)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = dflash_generate(target, drafter, PROMPT, 20, set(), temperature=1.0, block_size=4, generator=g1)
    b = dflash_generate(target, drafter, PROMPT, 20, set(), temperature=1.0, block_size=4, generator=g2)
    assert a.tokens == b.tokens and len(a.tokens) == 20


def test_kv_cache_passed_by_the_installed_transformers_name():
    """Both loops hand the KV cache under the forward keyword the installed transformers uses, so no bench log
    repeats "FutureWarning: `past_key_values` is deprecated ... Use `cache` instead" (newer 5.x renamed it)."""
    import warnings

    target = tiny_target()
    drafter = _drafter(target)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        target_generate(target, PROMPT, 8, eos=set())
        dflash_generate(target, drafter, PROMPT, 8, eos=set())
    assert not [w for w in seen if "past_key_values" in str(w.message)], [str(w.message) for w in seen][:3]
