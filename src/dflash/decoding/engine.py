"""The local decode engines behind one interface, as the bench stage and `benchmarks/decode_speed.py` use them.

* `hf`: the eager HF loop (`decoding/hf.py`), the reference;
* `fast`: static KV caches and fixed-shape steps (`decoding/fast.py`), captured as CUDA graphs on a GPU (optionally
  compiled), run directly on CPU. Its caches grow and its steps are captured in `prepare`, outside every timed
  region; the time this takes is counted in `capture_s`.

Both run DFlash and the target-only baseline at batch 1, at any temperature, commit the target's tokens and time a
generation the same way (`Generation`: prefill, decode, the drafter's first pass; see `decoding/hf.py`).
"""

from __future__ import annotations

import time

import torch

from dflash.decoding.fast import FastDecoder
from dflash.decoding.hf import DrafterProposer, Generation, dflash_generate, target_generate

ENGINES = ("hf", "fast")
DEFAULT_BLOCK = 16            # the step shape of a target-only engine (no drafter; only the baseline runs on it)


class Engine:
    def __init__(self, kind: str, target, drafter, block_size: int | None = None, compile: bool | dict = False,
                 graphs: bool | None = None, max_len: int = 2048, name: str | None = None):
        if kind not in ENGINES:
            raise ValueError(f"engine {kind!r}: expected one of {ENGINES}")
        self.kind, self.name, self.target, self.drafter = kind, name or kind, target, drafter
        self.bs = block_size or (drafter.config.block_size if drafter is not None else DEFAULT_BLOCK)
        self.dec = (FastDecoder(target, drafter, max_len=max_len, block_size=self.bs, graphs=graphs,
                                compile=compile) if kind == "fast" else None)
        self.capture_s, self.captures, self._captured = 0.0, 0, False

    @property
    def graphs(self) -> bool:
        """Whether the steps run as CUDA graphs."""
        return self.dec is not None and self.dec.use_graphs

    def prepare(self, needed: int, headroom: int = 0) -> None:
        """Room for `needed` positions (prompt + new tokens) before a generation: the fast engine re-allocates its
        caches when they are too small (for `needed + headroom`) and runs (captures) every step once more."""
        if self.dec is None:
            return
        if self.dec.ensure(needed, headroom) or not self._captured:
            t = time.perf_counter()
            self.dec.warm_up()
            self.capture_s += time.perf_counter() - t
            self.captures += 1
            self._captured = True

    def warm_up(self, prompt_ids: list[int], needed: int, n: int = 8) -> float:
        """Room for `needed` positions, then a short DFlash (with a drafter) and target-only generation, not
        recorded (kernels, allocator, graphs); the seconds it all took."""
        t = time.perf_counter()
        self.prepare(needed)
        if self.drafter is not None:
            self.dflash(prompt_ids, n, set())
        self.target_generate(prompt_ids, n, set())
        return time.perf_counter() - t

    def dflash(self, prompt_ids: list[int], max_new_tokens: int, eos: set[int], temperature: float = 0.0,
               generator=None, propose=None, force=None) -> Generation:
        """DFlash decoding. `propose(tokens, start, pending, bs)` replaces the drafter; `force(tokens, start,
        drafts, bs) -> (bs-1,) ids` lets the drafter run, then replaces its proposal `drafts` before verification."""
        self.prepare(len(prompt_ids) + max_new_tokens)
        if self.dec is not None:
            return self.dec.dflash_generate(prompt_ids, max_new_tokens, eos, temperature, generator, propose, force)
        if force is not None:
            drafter = DrafterProposer(self.drafter, self.target)

            def propose(tokens, start, pending, bs):
                return force(tokens, start, drafter(tokens, start, pending, bs), bs)

        return dflash_generate(self.target, self.drafter, prompt_ids, max_new_tokens, eos, temperature, self.bs,
                               generator, propose)

    def target_generate(self, prompt_ids: list[int], max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                        generator=None) -> Generation:
        """Target-only decoding, one token per forward (the baseline)."""
        self.prepare(len(prompt_ids) + max_new_tokens)
        if self.dec is not None:
            return self.dec.target_generate(prompt_ids, max_new_tokens, eos, temperature, generator)
        return target_generate(self.target, prompt_ids, max_new_tokens, eos, temperature, generator)

    @torch.no_grad()
    def top2(self, ids: list[int]) -> dict:
        """The target's two most likely tokens after `ids` and the gap between their logits (one uncached HF
        forward): where two outputs first differ, a gap near 0 is a numerical tie, a large one a bug."""
        logits = self.target(input_ids=torch.tensor([ids], device=self.target.device), logits_to_keep=1)
        values, idx = logits.logits[0, -1].float().topk(2)
        return {"top2_ids": idx.tolist(), "top2_gap": float(values[0] - values[1])}
