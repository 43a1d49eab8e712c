"""The HF engine: DFlash speculative decoding as z-lab defines it, and the target-only baseline (batch 1).

Per step: block = [last committed token, mask x (B-1)]; the drafter fills the masks greedily in one forward from the
target context not yet in its cache; the target verifies the block in one forward; the longest prefix where the
draft equals the target's own choice is accepted, plus the target's next token (the bonus): tau per step = a + 1.
Verification samples from the target, so every emitted token is the target's (lossless at any temperature).
Steps stop as z-lab's `dflash_generate` stops them (`more_steps`), so the per-step accept lengths are z-lab's.

Timing (CUDA-synchronised): `prefill_s` is the target's prefill and first token; `decode_s` runs from there to the
end (the project's definition); `draft_prefill_s` is the part of it spent in the drafter's first pass (its first
call, which also reads the whole prompt context). z-lab restarts the clock after that pass: `decode_s_zlab`.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field

import torch


@functools.cache
def _cache_name(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """The KV cache as the forward keyword of the installed transformers: `cache` in newer 5.x releases (where
    `past_key_values` still works but logs that it is deprecated), `past_key_values` in earlier ones."""
    return {_cache_name(type(model)): cache}


def crop_cache(cache, length: int) -> None:
    """Keep the first `length` positions of an HF DynamicCache (works across transformers 5.x crop APIs)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Generation:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    accept_lengths: list[int] = field(default_factory=list)
    draft_prefill_s: float = 0.0        # the drafter's first pass, part of decode_s (0 without a drafter)

    @property
    def decode_s_zlab(self) -> float:
        """Decode time with z-lab's clock: restarted after the drafter's first pass over the prompt."""
        return self.decode_s - self.draft_prefill_s


def more_steps(committed: int, max_new_tokens: int, steps: int, eos_seen: bool) -> bool:
    """z-lab's stopping rule (dflash/model.py, `dflash_generate`), for DFlash and the target-only baseline (z-lab's
    baseline is the same loop at block size 1): a step runs `while start < max_length`, i.e. while at most
    `max_new_tokens` tokens are committed (so one more step runs when exactly `max_new_tokens` are), and the stop
    tokens are checked after each step, so a first generated token (from prefill) that is EOS still gets one step.
    `committed`: tokens generated so far, the prefill's included; `eos_seen`: whether any of them is a stop token.
    The output is cut to `max_new_tokens` and at the first stop token either way (`truncate`)."""
    return committed <= max_new_tokens and not (steps and eos_seen)


def truncate(tokens: list[int], max_new: int, eos: set[int]) -> list[int]:
    tokens = tokens[:max_new]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def target_generate(target, prompt_ids: list[int], max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                    generator=None) -> Generation:
    """Target-only decoding with a KV cache, one token per forward."""
    from transformers import DynamicCache

    dev = target.device
    cache = DynamicCache()
    sync(dev)
    t0 = time.perf_counter()
    out = target(input_ids=torch.tensor([prompt_ids], device=dev), **with_cache(target, cache), use_cache=True,
                 logits_to_keep=1)
    tok = pick(out.logits[0, -1], temperature, generator)
    tokens = [int(tok)]
    sync(dev)
    t1 = time.perf_counter()
    steps, eos_seen = 0, tokens[0] in eos
    while more_steps(len(tokens), max_new_tokens, steps, eos_seen):
        out = target(input_ids=tok.view(1, 1), **with_cache(target, cache), use_cache=True)
        tok = pick(out.logits[0, -1], temperature, generator)
        tokens.append(int(tok))
        steps, eos_seen = steps + 1, eos_seen or tokens[-1] in eos
    sync(dev)
    return Generation(truncate(tokens, max_new_tokens, eos), t1 - t0, time.perf_counter() - t1)


class DrafterProposer:
    """Drafts a block with the DFlash drafter: fills bs-1 masks greedily from the context not yet in its cache."""

    def __init__(self, drafter, target):
        self.drafter, self.cfg = drafter, drafter.config
        self.embed, self.lm_head = target.get_input_embeddings(), target.get_output_embeddings()
        self.dtype = next(drafter.parameters()).dtype
        self.cache, self.cached = drafter.new_cache(), 0

    def __call__(self, tokens: list[int], start: int, pending: torch.Tensor, bs: int) -> torch.Tensor:
        dev = pending.device
        block = torch.full((1, bs), self.cfg.mask_token_id, device=dev)
        block[0, 0] = tokens[-1]
        positions = torch.arange(self.cached, start + bs, device=dev)[None]
        hidden = self.drafter(self.embed(block).to(self.dtype), pending.to(self.dtype), positions, cache=self.cache)
        self.cached = start                                  # the cache keeps context only, never block tokens
        return self.lm_head(hidden[0, 1:].to(self.lm_head.weight.dtype)).argmax(-1)


@torch.no_grad()
def dflash_generate(target, drafter, prompt_ids: list[int], max_new_tokens: int, eos: set[int],
                    temperature: float = 0.0, block_size: int | None = None, generator=None,
                    propose=None) -> Generation:
    """DFlash decoding; `propose(tokens, start, pending, bs) -> (bs-1,) ids` defaults to the drafter's proposal."""
    from transformers import DynamicCache

    dev = target.device
    bs = block_size or drafter.config.block_size
    layer_ids = drafter.config.target_layer_ids
    propose = propose or DrafterProposer(drafter, target)
    cache = DynamicCache()
    sync(dev)
    t0 = time.perf_counter()
    out = target(input_ids=torch.tensor([prompt_ids], device=dev), **with_cache(target, cache), use_cache=True,
                 output_hidden_states=True, logits_to_keep=1)
    tokens = [int(pick(out.logits[0, -1], temperature, generator))]
    pending = torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)   # context not yet in draft cache
    sync(dev)
    t1 = time.perf_counter()
    accept, first_pass, eos_seen = [], 0.0, tokens[0] in eos
    while more_steps(len(tokens), max_new_tokens, len(accept), eos_seen):
        start = len(prompt_ids) + len(tokens) - 1            # position of the last committed token
        draft = propose(tokens, start, pending, bs).view(1, bs - 1)
        if not accept:                                       # the drafter's first pass, over the prompt context
            sync(dev)
            first_pass = time.perf_counter() - t1
        verify = torch.cat([torch.tensor([[tokens[-1]]], device=dev), draft], dim=1)
        out = target(input_ids=verify, **with_cache(target, cache), use_cache=True, output_hidden_states=True)
        post = pick(out.logits[0], temperature, generator)                       # (bs,)
        a = int(torch.cumprod((draft[0] == post[:-1]).int(), 0).sum())
        new = draft[0, :a].tolist() + [int(post[a])]
        tokens += new
        eos_seen = eos_seen or bool(eos.intersection(new))
        accept.append(a + 1)
        crop_cache(cache, start + a + 1)
        pending = torch.cat([out.hidden_states[i + 1][:, : a + 1] for i in layer_ids], dim=-1)
    sync(dev)
    return Generation(truncate(tokens, max_new_tokens, eos), t1 - t0, time.perf_counter() - t1, accept, first_pass)
