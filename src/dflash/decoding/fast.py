"""Fast batch-1 decoding for the DFlash loop: static KV caches, fixed-shape steps, CUDA graphs (optionally compiled).

The eager HF engine (decoding/hf.py) is launch-bound: every step runs thousands of small kernels through Python and
HF's cache classes. Here the target forward is re-implemented over the HF model's own weights (embedding, per-layer
q/k/v/o, optional q_norm/k_norm, RoPE from the model's rotary module, SiLU MLP, final norm, LM head; Qwen3, Qwen2
and Llama layers) with the same operations in the same order, and the drafter forward over `DFlashDrafter`'s
weights. The per-token calls have fixed shapes, so each is captured once as a CUDA graph and replayed:

* target-only step: 1 token at position `start`;
* draft step: the block [last token, mask x (B-1)] at positions start..start+B-1, plus up to B context rows;
* verify step: the B tokens [last token, drafts] at positions start..start+B-1.

Prefill (prompt length varies) stays eager. On CPU the same step functions run directly, without graphs.

Static caches without cropping
------------------------------
Every cache is a tensor over absolute positions 0..L-1 and attention uses a mask over absolute positions, so rejected
entries never need to be cropped:

* Target cache. Invariant before a step: positions < `start` (the position of the last committed token) hold the
  K/V of the committed tokens; positions >= `start` hold anything finite. A forward for queries at positions
  [start, start+T) first writes K/V at exactly those positions and then attends under `key_pos <= query_pos`, so it
  reads only positions <= start+T-1: committed ones or ones it has just written. After a verify that accepts `a`
  drafts, the new `start` is start+a+1; positions start..start+a were written from tokens that are now committed
  (the last token and the `a` accepted drafts), and positions start+a+1..start+B-1 hold rejected drafts, which lie
  at or beyond the new `start`: invisible until the next verify overwrites them (it writes start+a+1..start+a+B).
* Drafter cache (context K/V only count). Invariant: positions < start-n hold the context K/V of committed
  positions, where n = a+1 rows of target features are pending. The draft step writes the pending rows at
  start-n..start-1, the block's own K/V at start..start+B-1, and attends under `key_pos < start+B` (bidirectional
  within the block, as the eager drafter). Block entries are stale after the step; the next step overwrites
  start..start+a with context and start+a+1.. with its block before reading them. The padding rows of the fixed
  B-row context input are written to a trash slot (position L-1 >= start+B), never visible.
* A masked entry contributes exactly zero (exp(-inf) = 0, times a finite value), which is why entries must be
  finite: caches start as zeros and are only ever written with values computed from real tokens.

Results therefore equal those of a cropped cache up to summation order; tests check equal tokens against the eager
engine and the cache contents against HF's DynamicCache.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dflash.decoding.hf import Generation, more_steps, pick, sync, truncate
from dflash.modeling.drafter import rope_cos_sin

SUPPORTED_TARGETS = ("qwen3", "qwen2", "llama")


# ---------------------------------------------------------------------------------------------------------------
# Functional layer pieces (same operations, in the same order, as HF's Qwen3/Llama layers and DFlashDrafter)

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (1, T, heads, D); cos/sin (1, T, 1, D); half-split layout."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln1_eps: float
    q: torch.Tensor
    qb: torch.Tensor | None
    k: torch.Tensor
    kb: torch.Tensor | None
    v: torch.Tensor
    vb: torch.Tensor | None
    o: torch.Tensor
    ob: torch.Tensor | None
    qn: torch.Tensor | None
    kn: torch.Tensor | None
    qk_eps: float
    ln2: torch.Tensor
    ln2_eps: float
    gate: torch.Tensor
    gate_b: torch.Tensor | None
    up: torch.Tensor
    up_b: torch.Tensor | None
    down: torch.Tensor
    down_b: torch.Tensor | None


def _w(t):
    return None if t is None else t.detach()


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or norm.eps)


def _layer(layer) -> _Layer:
    a, m = layer.self_attn, layer.mlp
    qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
    return _Layer(ln1=_w(layer.input_layernorm.weight), ln1_eps=_eps(layer.input_layernorm),
                  q=_w(a.q_proj.weight), qb=_w(a.q_proj.bias), k=_w(a.k_proj.weight), kb=_w(a.k_proj.bias),
                  v=_w(a.v_proj.weight), vb=_w(a.v_proj.bias), o=_w(a.o_proj.weight), ob=_w(a.o_proj.bias),
                  qn=None if qn is None else _w(qn.weight), kn=None if kn is None else _w(kn.weight),
                  qk_eps=_eps(qn) if qn is not None else 0.0,
                  ln2=_w(layer.post_attention_layernorm.weight), ln2_eps=_eps(layer.post_attention_layernorm),
                  gate=_w(m.gate_proj.weight), gate_b=_w(m.gate_proj.bias), up=_w(m.up_proj.weight),
                  up_b=_w(m.up_proj.bias), down=_w(m.down_proj.weight), down_b=_w(m.down_proj.bias))


def _pre_attn(x, ln, ln_eps, qw, qb, kw, kb, vw, vb, qn, kn, qk_eps, cos, sin, nkv: int, hd: int):
    """x (1, T, H) -> q (1, nkv, g*T, D) with the GQA groups folded into rows, roped k (1, T, nkv, D), v."""
    t = x.shape[1]
    h = _rms(x, ln, ln_eps)
    q = F.linear(h, qw, qb).view(1, t, -1, hd)
    k = F.linear(h, kw, kb).view(1, t, -1, hd)
    v = F.linear(h, vw, vb).view(1, t, -1, hd)
    if qn is not None:
        q, k = _rms(q, qn, qk_eps), _rms(k, kn, qk_eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    # head h uses kv head h // g (HF's repeat_kv order): (1, T, nkv, g, D) -> (1, nkv, g*T, D), row = gi*T + t
    q = q.view(1, t, nkv, -1, hd).permute(0, 2, 3, 1, 4).reshape(1, nkv, -1, hd)
    return q, k, v


def _post_attn(x, o, ow, ob, ln, ln_eps, gw, gb, uw, ub, dw, db, nkv: int, hd: int):
    """Attention output o (1, nkv, g*T, D) -> the layer's output (1, T, H): o_proj, residual, SiLU MLP, residual."""
    t = x.shape[1]
    o = o.view(1, nkv, -1, t, hd).permute(0, 3, 1, 2, 4).reshape(1, t, -1)
    x = x + F.linear(o, ow, ob)
    h = _rms(x, ln, ln_eps)
    return x + F.linear(F.silu(F.linear(h, gw, gb)) * F.linear(h, uw, ub), dw, db)


def _ctx_kv(ctx, kw, kn, eps, vw, cos, sin, hd: int):
    """Drafter context keys/values: k_norm(k_proj(ctx)) roped, v_proj(ctx); (1, C, nkv, D) each."""
    c = ctx.shape[1]
    k = _rms(F.linear(ctx, kw).view(1, c, -1, hd), kn, eps)
    return _rope(k, cos, sin), F.linear(ctx, vw).view(1, c, -1, hd)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _write(cache: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> None:
    """cache (nkv, L, D) <- x (1, T, nkv, D) at absolute positions pos (T,)."""
    cache.index_copy_(1, pos, x[0].transpose(0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Fixed-shape steps, optionally captured as CUDA graphs

class _Step:
    """A state-to-state function of static buffers; on CUDA captured once as a graph, then replayed.

    The function must be idempotent for a given state (it reads static inputs and writes static outputs and cache
    slots determined by them), so capturing lazily in the middle of a generation is harmless."""

    def __init__(self, fn, use_graph: bool):
        self.fn, self.use_graph, self.graph = fn, use_graph, None

    def __call__(self) -> None:
        if not self.use_graph:
            self.fn()
            return
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):                  # warm-up (and compile) outside the capture
                    self.fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.fn()
            self.graph = graph
        self.graph.replay()

    def reset(self) -> None:
        self.graph = None


class FastDecoder:
    """Static-cache decoder for one target (and optionally one DFlash drafter), batch 1.

    `graphs`: capture the fixed-shape steps as CUDA graphs (default: on CUDA). `compile`: torch.compile the
    per-layer pieces of the fixed-shape steps (elementwise fusion; GEMMs and attention stay library calls); a dict
    is passed on to torch.compile (e.g. {"backend": "eager"} to check tracing only)."""

    def __init__(self, target, drafter=None, max_len: int = 2048, block_size: int | None = None,
                 graphs: bool | None = None, compile: bool | dict = False):
        cfg = target.config
        if getattr(cfg, "model_type", None) not in SUPPORTED_TARGETS:
            raise NotImplementedError(f"fast path supports {SUPPORTED_TARGETS}, not {cfg.model_type!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"fast path supports SiLU MLPs, not {cfg.hidden_act}")
        for layer in target.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                raise NotImplementedError("fast path does not support sliding-window attention layers")
        rope_type = getattr(target.model.rotary_emb, "rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            raise NotImplementedError(f"fast path needs a static RoPE, not {rope_type!r}")
        # weak references only: a cached decoder must not keep its models alive (see get_decoder)
        self.target_ref = weakref.ref(target)
        self.drafter_ref = None if drafter is None else weakref.ref(drafter)
        self.has_drafter = drafter is not None
        self.dev = target.get_input_embeddings().weight.device
        self.dtype = target.get_input_embeddings().weight.dtype
        attn0 = target.model.layers[0].self_attn
        self.hd = attn0.head_dim
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scale = float(getattr(attn0, "scaling", self.hd ** -0.5))
        self.layers = [_layer(layer) for layer in target.model.layers]
        self.embed_w = target.get_input_embeddings().weight.detach()
        self.norm_w, self.norm_eps = target.model.norm.weight.detach(), _eps(target.model.norm)
        lm = target.get_output_embeddings()
        self.lm_w, self.lm_b = lm.weight.detach(), _w(lm.bias)
        self.rotary = target.model.rotary_emb
        self.feat_ids: list[int] = []
        if drafter is not None:
            dc = drafter.config
            self.feat_ids = list(dc.target_layer_ids)
            self.bs = block_size or dc.block_size
            self.ddtype = next(drafter.parameters()).dtype
            self.dlayers = [_layer(layer) for layer in drafter.layers]
            self.dhd, self.dnkv, self.dnh = dc.head_dim, dc.num_key_value_heads, dc.num_attention_heads
            self.dtheta, self.mask_id = dc.rope_theta, dc.mask_token_id
            self.fc_w = drafter.fc.weight.detach()
            self.hnorm_w, self.hnorm_eps = drafter.hidden_norm.weight.detach(), drafter.hidden_norm.eps
            self.dnorm_w, self.dnorm_eps = drafter.norm.weight.detach(), drafter.norm.eps
        else:
            self.bs = block_size or 16
        self.use_graphs = (self.dev.type == "cuda") if graphs is None else bool(graphs)
        if self.use_graphs and self.dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA target")
        self.compiled = bool(compile)
        if compile:
            dyn = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dyn, name):
                    setattr(dyn, name, max(getattr(dyn, name), 64))
            opts = {"dynamic": False, "fullgraph": True, **(compile if isinstance(compile, dict) else {})}
            self._pre_s = torch.compile(_pre_attn, **opts)
            self._post_s = torch.compile(_post_attn, **opts)
            self._ctx_s = torch.compile(_ctx_kv, **opts)
        else:
            self._pre_s, self._post_s, self._ctx_s = _pre_attn, _post_attn, _ctx_kv
        self.target_step = _Step(self._target_step, self.use_graphs)
        self.verify_step = _Step(self._verify_step, self.use_graphs)
        self.draft_step = _Step(self._draft_step, self.use_graphs)
        self.L = 0
        self._alloc(max_len)

    # -- buffers ------------------------------------------------------------------------------------------------
    def _alloc(self, max_len: int) -> None:
        """Caches over absolute positions 0..L-1 (the last one is the drafter's trash slot) and static I/O."""
        bs, dev, dt = self.bs, self.dev, self.dtype
        self.L = -(-(max_len + 2 * bs + 1) // 64) * 64
        n_layers = len(self.layers)
        self.tk = torch.zeros(n_layers, self.nkv, self.L, self.hd, device=dev, dtype=dt)
        self.tv = torch.zeros_like(self.tk)
        self.kpos = torch.arange(self.L, device=dev)
        self.ar = torch.arange(bs, device=dev)
        self.start_t = torch.zeros(1, dtype=torch.long, device=dev)     # position of the last committed token
        self.tok_t = torch.zeros(1, dtype=torch.long, device=dev)       # target-only input token
        self.logits_1 = torch.zeros(1, self.lm_w.shape[0], device=dev, dtype=dt)
        self.verify_ids = torch.zeros(bs, dtype=torch.long, device=dev)  # [last token, drafts]
        self.logits_v = torch.zeros(bs, self.lm_w.shape[0], device=dev, dtype=dt)
        if self.has_drafter:
            self.dk = torch.zeros(len(self.dlayers), self.dnkv, self.L, self.dhd, device=dev, dtype=self.ddtype)
            self.dv = torch.zeros_like(self.dk)
            self.nctx_t = torch.zeros(1, dtype=torch.long, device=dev)  # pending context rows in `feat`
            self.feat = torch.zeros(bs, len(self.feat_ids) * self.embed_w.shape[1], device=dev, dtype=dt)
            self.mask_ids = torch.full((bs - 1,), self.mask_id, dtype=torch.long, device=dev)
        for step in (self.target_step, self.verify_step, self.draft_step):
            step.reset()

    def ensure(self, needed: int, headroom: int = 0) -> bool:
        """Make room for `needed` = prompt + new tokens; if too small, re-allocate for `needed + headroom` and drop
        the captured graphs. Returns whether it re-allocated."""
        if needed + 2 * self.bs + 1 <= self.L:
            return False
        self._alloc(needed + headroom)
        return True

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run every fixed-shape step once, capturing its CUDA graph (and compiling it): what would otherwise
        happen inside the first timed generation. The steps run at positions 0..B-1 on whatever the buffers hold
        (finite values), which the next generation's prefill overwrites or its masks hide."""
        self.start_t.zero_()
        self.tok_t.zero_()
        self.verify_ids.zero_()
        steps = [self.target_step, self.verify_step]
        if self.has_drafter:
            self.nctx_t.zero_()
            steps.append(self.draft_step)
        with self.sdpa_context():
            for step in steps:
                step()
        sync(self.dev)

    def sdpa_context(self):
        """The attention-kernel choice every forward of this decoder runs under (a no-op off CUDA)."""
        if self.dev.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # masked attention: the memory-efficient kernel (capturable, one plan for all lengths), math as fallback
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    # -- target -------------------------------------------------------------------------------------------------
    def _target_forward(self, ids: torch.Tensor, qpos: torch.Tensor, feats: bool, last_only: bool, step: bool):
        """ids (1, T) at absolute positions qpos (T,): writes the target cache, returns (logits, features or None).

        features = concatenated outputs of decoder layers `feat_ids` (HF hidden_states[i + 1]; for the last layer
        HF returns the normed state, and so does this)."""
        pre, post = (self._pre_s, self._post_s) if step else (_pre_attn, _post_attn)
        g = self.nh // self.nkv
        x = F.embedding(ids, self.embed_w)
        cos, sin = self.rotary(x, qpos[None])
        cos, sin = cos[:, :, None], sin[:, :, None]
        mask = _additive((self.kpos[None, :] <= qpos[:, None]).repeat(g, 1), x.dtype)[None, None]
        want, got = set(self.feat_ids) if feats else set(), {}
        for i, w in enumerate(self.layers):
            q, k, v = pre(x, w.ln1, w.ln1_eps, w.q, w.qb, w.k, w.kb, w.v, w.vb, w.qn, w.kn, w.qk_eps, cos, sin,
                          self.nkv, self.hd)
            _write(self.tk[i], qpos, k)
            _write(self.tv[i], qpos, v)
            o = F.scaled_dot_product_attention(q, self.tk[i][None], self.tv[i][None], attn_mask=mask,
                                               scale=self.scale)
            x = post(x, o, w.o, w.ob, w.ln2, w.ln2_eps, w.gate, w.gate_b, w.up, w.up_b, w.down, w.down_b,
                     self.nkv, self.hd)
            if i in want:
                got[i] = x
        h = _rms(x, self.norm_w, self.norm_eps)
        if len(self.layers) - 1 in want:
            got[len(self.layers) - 1] = h
        logits = F.linear(h[:, -1:] if last_only else h, self.lm_w, self.lm_b)
        return logits, (torch.cat([got[i] for i in self.feat_ids], dim=-1) if feats else None)

    def _target_step(self) -> None:
        logits, _ = self._target_forward(self.tok_t[None], self.start_t, False, True, True)
        self.logits_1.copy_(logits[0])

    def _verify_step(self) -> None:
        logits, feats = self._target_forward(self.verify_ids[None], self.start_t + self.ar,
                                             self.has_drafter, False, True)
        self.logits_v.copy_(logits[0])
        if feats is not None:
            self.feat.copy_(feats[0])

    # -- drafter ------------------------------------------------------------------------------------------------
    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        return _rms(F.linear(feats.to(self.ddtype), self.fc_w), self.hnorm_w, self.hnorm_eps)

    def _ingest(self, feats: torch.Tensor) -> None:
        """Eager: context K/V of the prompt's target features (1, P, n*H) at positions 0..P-1."""
        pos = torch.arange(feats.shape[1], device=self.dev)
        ctx = self._project(feats)
        cos, sin = rope_cos_sin(pos[None], self.dhd, self.dtheta, self.ddtype)
        for i, w in enumerate(self.dlayers):
            k, v = _ctx_kv(ctx, w.k, w.kn, w.qk_eps, w.v, cos[:, :, None], sin[:, :, None], self.dhd)
            _write(self.dk[i], pos, k)
            _write(self.dv[i], pos, v)

    def _draft_step(self) -> None:
        """Pending context rows feat[:n] at positions start-n..start-1 (padding rows -> trash slot), block at
        start..start+B-1; drafts (argmax of the target LM head) -> verify_ids[1:]."""
        bs, start, n = self.bs, self.start_t, self.nctx_t
        g = self.dnh // self.dnkv
        cpos = start - n + self.ar
        cidx = torch.where(self.ar < n, cpos, self.L - 1)
        bpos = start + self.ar
        ctx = self._project(self.feat[None])
        ccos, csin = rope_cos_sin(cpos[None], self.dhd, self.dtheta, self.ddtype)
        bcos, bsin = rope_cos_sin(bpos[None], self.dhd, self.dtheta, self.ddtype)
        ccos, csin, bcos, bsin = ccos[:, :, None], csin[:, :, None], bcos[:, :, None], bsin[:, :, None]
        x = F.embedding(torch.cat([self.verify_ids[:1], self.mask_ids])[None], self.embed_w).to(self.ddtype)
        mask = _additive((self.kpos < start + bs)[None, :].expand(g * bs, -1), self.ddtype)[None, None]
        for i, w in enumerate(self.dlayers):
            ck, cv = self._ctx_s(ctx, w.k, w.kn, w.qk_eps, w.v, ccos, csin, self.dhd)
            _write(self.dk[i], cidx, ck)
            _write(self.dv[i], cidx, cv)
            q, k, v = self._pre_s(x, w.ln1, w.ln1_eps, w.q, w.qb, w.k, w.kb, w.v, w.vb, w.qn, w.kn, w.qk_eps,
                                  bcos, bsin, self.dnkv, self.dhd)
            _write(self.dk[i], bpos, k)
            _write(self.dv[i], bpos, v)
            o = F.scaled_dot_product_attention(q, self.dk[i][None], self.dv[i][None], attn_mask=mask)
            x = self._post_s(x, o, w.o, w.ob, w.ln2, w.ln2_eps, w.gate, w.gate_b, w.up, w.up_b, w.down, w.down_b,
                             self.dnkv, self.dhd)
        h = _rms(x, self.dnorm_w, self.dnorm_eps)
        logits = F.linear(h[0, 1:].to(self.lm_w.dtype), self.lm_w, self.lm_b)
        self.verify_ids[1:].copy_(logits.argmax(-1))

    # -- public pieces (used by the benchmark's checks) ---------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eager target prefill at positions 0..P-1: (last-position logits (1, 1, V), features (1, P, n*H))."""
        self.ensure(len(prompt_ids))
        ids = torch.tensor([prompt_ids], device=self.dev)
        with self.sdpa_context():
            return self._target_forward(ids, torch.arange(ids.shape[1], device=self.dev), bool(self.feat_ids),
                                        True, False)

    @torch.no_grad()
    def verify(self, block_ids: list[int], start: int) -> torch.Tensor:
        """One verify step of `block_ids` (B,) at positions start..start+B-1; returns a copy of its logits (B, V)."""
        self.verify_ids.copy_(torch.tensor(block_ids, device=self.dev))
        self.start_t.fill_(start)
        with self.sdpa_context():
            self.verify_step()
        return self.logits_v.clone()

    # -- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def target_generate(self, prompt_ids: list[int], max_new_tokens: int, eos: set[int],
                        temperature: float = 0.0, generator=None) -> Generation:
        """Target-only decoding, one token per step (same contract as decoding.hf.target_generate)."""
        self.ensure(len(prompt_ids) + max_new_tokens)
        sync(self.dev)
        t0 = time.perf_counter()
        logits, _ = self.prefill(prompt_ids)
        tok = pick(logits[0, -1], temperature, generator)
        tokens = [int(tok)]
        sync(self.dev)
        t1 = time.perf_counter()
        self.start_t.fill_(len(prompt_ids))
        self.tok_t.copy_(tok.view(1))
        steps, eos_seen = 0, tokens[0] in eos
        with self.sdpa_context():
            while more_steps(len(tokens), max_new_tokens, steps, eos_seen):
                self.target_step()
                tok = pick(self.logits_1[0], temperature, generator)
                self.tok_t.copy_(tok.view(1))
                self.start_t.add_(1)
                tokens.append(int(tok))
                steps, eos_seen = steps + 1, eos_seen or tokens[-1] in eos
        sync(self.dev)
        return Generation(truncate(tokens, max_new_tokens, eos), t1 - t0, time.perf_counter() - t1)

    @torch.no_grad()
    def dflash_generate(self, prompt_ids: list[int], max_new_tokens: int, eos: set[int], temperature: float = 0.0,
                        generator=None, propose=None, force=None) -> Generation:
        """DFlash decoding (same contract as decoding.hf.dflash_generate). `propose(tokens, start, pending, bs)`
        replaces the drafter (pending: the target features of the context not yet shown to a drafter).
        `force(tokens, start, drafts, bs) -> (bs-1,) ids` lets the drafter run (cost and cache bookkeeping as
        usual) and then replaces its proposal `drafts` (a device tensor) before verification: forced acceptance
        patterns for checks and benchmarks.

        Timing as the eager engine's: the drafter's first pass (here: reading the prompt's context into the draft
        cache, then the first draft step) is part of decode_s and measured as draft_prefill_s."""
        if not self.has_drafter and propose is None:
            raise ValueError("a FastDecoder without a drafter needs `propose`")
        bs, p = self.bs, len(prompt_ids)
        self.ensure(p + max_new_tokens)
        sync(self.dev)
        t0 = time.perf_counter()
        logits, feats = self.prefill(prompt_ids)
        tokens = [int(pick(logits[0, -1], temperature, generator))]
        pending = feats
        sync(self.dev)
        t1 = time.perf_counter()
        accept: list[int] = []
        first_pass = 0.0
        start = p                                             # position of the last committed token
        self.start_t.fill_(start)
        self.verify_ids[:1].fill_(tokens[-1])
        if self.has_drafter:
            self.nctx_t.fill_(0)                              # the prompt context goes in by _ingest
        with self.sdpa_context():
            eos_seen = tokens[0] in eos
            while more_steps(len(tokens), max_new_tokens, len(accept), eos_seen):
                if propose is None:
                    if not accept:
                        self._ingest(feats)
                    self.draft_step()
                    if force is not None:
                        self.verify_ids[1:].copy_(force(tokens, start, self.verify_ids[1:], bs).view(-1))
                else:
                    self.verify_ids[1:].copy_(propose(tokens, start, pending, bs).view(-1))
                if not accept:                                # the drafter's first pass, over the prompt context
                    sync(self.dev)
                    first_pass = time.perf_counter() - t1
                self.verify_step()
                post = pick(self.logits_v, temperature, generator)
                vals = torch.cat([self.verify_ids[1:], post.view(-1)]).tolist()      # the step's one sync
                draft, post_l = vals[: bs - 1], vals[bs - 1:]
                a = 0
                while a < bs - 1 and draft[a] == post_l[a]:
                    a += 1
                new = draft[:a] + [post_l[a]]
                tokens += new
                eos_seen = eos_seen or bool(eos.intersection(new))
                accept.append(a + 1)
                start += a + 1
                self.start_t.fill_(start)
                self.verify_ids[:1].fill_(post_l[a])
                if self.has_drafter:
                    self.nctx_t.fill_(a + 1)
                if propose is not None:
                    pending = self.feat[None, : a + 1] if self.has_drafter else None
        sync(self.dev)
        return Generation(truncate(tokens, max_new_tokens, eos), t1 - t0, time.perf_counter() - t1, accept,
                          first_pass)


# ---------------------------------------------------------------------------------------------------------------
# Module-level entry points with a cache of decoders (graphs are captured once per target/drafter/shape)

_DECODERS: dict[tuple, FastDecoder] = {}


def clear_decoders() -> None:
    """Drop every cached FastDecoder (their caches, graphs and references to model weights)."""
    _DECODERS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def get_decoder(target, drafter=None, block_size: int | None = None, max_len: int = 2048,
                graphs: bool | None = None, compile: bool | dict = False) -> FastDecoder:
    """The cached FastDecoder for (target, drafter, block size, graphs, compile), grown to `max_len` if needed."""
    bs = block_size or (drafter.config.block_size if drafter is not None else 16)
    key = (id(target), None if drafter is None else id(drafter), bs, graphs,
           tuple(sorted(compile.items())) if isinstance(compile, dict) else compile)
    dec = _DECODERS.get(key)
    if dec is not None and (dec.target_ref() is not target
                            or (dec.drafter_ref() if dec.drafter_ref else None) is not drafter):
        dec = None                                            # id() reused by a new object
    if dec is None:
        dec = FastDecoder(target, drafter, max_len=max_len, block_size=bs, graphs=graphs, compile=compile)
        _DECODERS[key] = dec
        weakref.finalize(target, _DECODERS.pop, key, None)
    dec.ensure(max_len)
    return dec


def fast_target_generate(target, prompt_ids: list[int], max_new_tokens: int, eos: set[int],
                         temperature: float = 0.0, generator=None, graphs: bool | None = None,
                         compile: bool = False) -> Generation:
    """Drop-in for decoding.hf.target_generate on the fast path."""
    dec = get_decoder(target, None, None, len(prompt_ids) + max_new_tokens, graphs, compile)
    return dec.target_generate(prompt_ids, max_new_tokens, eos, temperature, generator)


def fast_dflash_generate(target, drafter, prompt_ids: list[int], max_new_tokens: int, eos: set[int],
                         temperature: float = 0.0, block_size: int | None = None, generator=None, propose=None,
                         force=None, graphs: bool | None = None, compile: bool = False) -> Generation:
    """Drop-in for decoding.hf.dflash_generate on the fast path (`force`: see FastDecoder.dflash_generate)."""
    dec = get_decoder(target, drafter, block_size, len(prompt_ids) + max_new_tokens, graphs, compile)
    return dec.dflash_generate(prompt_ids, max_new_tokens, eos, temperature, generator, propose, force)
