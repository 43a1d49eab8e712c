"""Where the fast engine's bf16 prefill features part from HF's, and why (issue 15).

`decode_speed.py` found, at Qwen3-8B shapes in bf16 on an H200, the fast path's prefill features 3% (relative norm)
away from HF's, where HF's cached and uncached forwards agree bit for bit. This script splits that number:

1. layer 0, op by op, each op fed the same input in both implementations: input RMSNorm, q/k/v projections with
   q/k norms, RoPE, attention, and o_proj + residual + MLP. Ops that match bit for bit are not the cause.
2. attention alone, on identical q/k/v: HF's sdpa call (causal flag over the T keys) against the fast path's call
   (GQA groups folded into rows, additive mask over the whole static cache), and variants in between.
3. every layer: the relative distance of each hidden state (HF `hidden_states[i + 1]`) between the fast prefill and
   HF's sdpa forward, beside the distance between two of HF's own attention implementations (sdpa vs eager) on the
   same weights: how much a last-bit difference in attention grows over the layers of this random-weight network.

    python benchmarks/bf16_drift.py --json drift.json                  # Qwen3-8B attention shapes, 36 layers
    python benchmarks/bf16_drift.py --inter 12288 --layers 8           # the real MLP width, fewer layers
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
import transformers

from dflash.decoding import fast


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"equal": bool(torch.equal(a, b)), "max_abs": (a.float() - b.float()).abs().max().item(), "rel": rel(a, b)}


def build(args, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv,
                      head_dim=args.head_dim, max_position_embeddings=40960, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                      initializer_range=args.init_std, attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def hf_attention(a, q, k, v):
    """HF's sdpa attention for a prefill without padding: (1, heads, T, D) each (k/v with KV heads) -> (1, T, heads,
    D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(a, q, k, v, attention_mask=None, scaling=a.scaling, dropout=0.0)[0]


def fast_attention(q, k, v, scale: float, cache_len: int, additive: bool = True):
    """The fast path's attention for positions 0..T-1: q (1, heads, T, D) folded to (1, nkv, g*T, D), k/v written into
    caches of `cache_len` positions, a mask over all of them; returns (1, T, heads, D)."""
    _, nh, t, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    qf = q.view(1, nkv, g, t, hd).reshape(1, nkv, g * t, hd)
    tk = torch.zeros(nkv, cache_len, hd, dtype=k.dtype)
    tv = torch.zeros_like(tk)
    pos = torch.arange(t)
    fast._write(tk, pos, k.transpose(1, 2))
    fast._write(tv, pos, v.transpose(1, 2))
    allowed = (torch.arange(cache_len)[None, :] <= pos[:, None]).repeat(g, 1)
    mask = fast._additive(allowed, q.dtype)[None, None] if additive else allowed[None, None]
    o = F.scaled_dot_product_attention(qf, tk[None], tv[None], attn_mask=mask, scale=scale)
    return o.view(1, nkv, g, t, hd).reshape(1, nh, t, hd).transpose(1, 2)


@torch.no_grad()
def layer0_ops(model, ids) -> dict:
    """Each op of layer 0 in both implementations on the same input."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    layer, a = model.model.layers[0], model.model.layers[0].self_attn
    w = fast._layer(layer)
    t, hd = ids.shape[1], a.head_dim
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
    out = {}
    h_hf = layer.input_layernorm(x)
    out["input_rmsnorm"] = diff(fast._rms(x, w.ln1, w.ln1_eps), h_hf)
    hs = (1, t, -1, hd)
    q_hf = a.q_norm(a.q_proj(h_hf).view(hs)).transpose(1, 2)
    k_hf = a.k_norm(a.k_proj(h_hf).view(hs)).transpose(1, 2)
    v_hf = a.v_proj(h_hf).view(hs).transpose(1, 2)
    qr_hf, kr_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
    qf, kf, vf = fast._pre_attn(x, w.ln1, w.ln1_eps, w.q, w.qb, w.k, w.kb, w.v, w.vb, w.qn, w.kn,
                                w.qk_eps, cos[:, :, None], sin[:, :, None], a.config.num_key_value_heads, hd)
    g = a.config.num_attention_heads // a.config.num_key_value_heads
    q_unfold = qf.view(1, -1, g, t, hd).reshape(1, -1, t, hd)
    out["q_proj+q_norm+rope"] = diff(q_unfold, qr_hf)
    out["k_proj+k_norm+rope"] = diff(kf.transpose(1, 2), kr_hf)
    out["v_proj"] = diff(vf.transpose(1, 2), v_hf)
    o_hf = hf_attention(a, qr_hf, kr_hf, v_hf)
    o_fast = fast_attention(qr_hf, kr_hf, v_hf, float(a.scaling), cache_len=t + 3 * 16 + 13)
    out["attention (same q, k, v)"] = diff(o_fast, o_hf)
    o_flat = o_hf.reshape(1, t, -1)
    y_hf = layer.mlp(layer.post_attention_layernorm(x + a.o_proj(o_flat)))
    y_hf = x + a.o_proj(o_flat) + y_hf
    o_folded = o_hf.transpose(1, 2).reshape(1, -1, g, t, hd).reshape(1, a.config.num_key_value_heads, g * t, hd)
    y_fast = fast._post_attn(x, o_folded, w.o, w.ob, w.ln2, w.ln2_eps, w.gate, w.gate_b, w.up, w.up_b, w.down,
                             w.down_b, a.config.num_key_value_heads, hd)
    out["o_proj+residual+mlp (same attention output)"] = diff(y_fast, y_hf)
    return out


@torch.no_grad()
def attention_variants(model, ids) -> dict:
    """Attention on identical q/k/v: which difference between the two calls changes the result."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    layer, a = model.model.layers[0], model.model.layers[0].self_attn
    t, hd = ids.shape[1], a.head_dim
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(x, torch.arange(t)[None])
    h = layer.input_layernorm(x)
    hs = (1, t, -1, hd)
    q, k = apply_rotary_pos_emb(a.q_norm(a.q_proj(h).view(hs)).transpose(1, 2),
                                a.k_norm(a.k_proj(h).view(hs)).transpose(1, 2), cos, sin)
    v = a.v_proj(h).view(hs).transpose(1, 2)
    ref = hf_attention(a, q, k, v)
    big = t + 3 * 16 + 13
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    g = q.shape[1] // k.shape[1]
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return {
        "fast call (folded rows, additive mask, cache of T+61)": diff(fast_attention(q, k, v, a.scaling, big), ref),
        "folded rows, additive mask, cache of exactly T": diff(fast_attention(q, k, v, a.scaling, t), ref),
        "folded rows, boolean mask, cache of exactly T": diff(fast_attention(q, k, v, a.scaling, t, False), ref),
        "unfolded heads (KV repeated), boolean causal mask": diff(F.scaled_dot_product_attention(
            q, kx, vx, attn_mask=causal, scale=a.scaling).transpose(1, 2), ref),
        "unfolded heads (KV repeated), is_causal": diff(F.scaled_dot_product_attention(
            q, kx, vx, is_causal=True, scale=a.scaling).transpose(1, 2), ref),
        "float32 attention on the same bf16 q/k/v (its bf16 rounding)": diff(F.scaled_dot_product_attention(
            q.float(), kx.float(), vx.float(), is_causal=True, scale=a.scaling).transpose(1, 2).to(q.dtype), ref),
    }


@torch.no_grad()
def per_layer(model, ids) -> list[dict]:
    n = model.config.num_hidden_layers
    dec = fast.FastDecoder(model, None, max_len=ids.shape[1] + 16, graphs=False)
    dec.feat_ids = list(range(n))
    _, feats = dec.prefill(ids[0].tolist())
    got = feats.view(1, ids.shape[1], n, -1)
    sdpa = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states
    model.set_attn_implementation("sdpa")
    return [{"layer": i, "fast_vs_hf_sdpa": rel(got[:, :, i], sdpa[i + 1]),
             "hf_eager_vs_hf_sdpa": rel(eager[i + 1], sdpa[i + 1]),
             "fast_equal": bool(torch.equal(got[:, :, i], sdpa[i + 1]))} for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=4096, help="Qwen3-8B: 12288 (default smaller to fit a CPU's memory)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--init-std", type=float, default=0.02)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    model = build(args, torch.bfloat16)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    res = {"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": f"cpu ({platform.processor() or platform.machine()})", "dtype": "bfloat16",
           "layer0_ops": layer0_ops(model, ids), "attention_variants": attention_variants(model, ids),
           "per_layer": per_layer(model, ids)}
    res["seconds"] = round(time.time() - t0, 1)
    for section in ("layer0_ops", "attention_variants"):
        print(f"{section}:")
        for name, d in res[section].items():
            print(f"  {name:<62} equal={d['equal']!s:<5} max_abs={d['max_abs']:.3g} rel={d['rel']:.3g}")
    print("per layer: relative distance of hidden_states[i + 1]")
    print("  layer  fast vs HF sdpa   HF eager vs HF sdpa")
    for r in res["per_layer"]:
        print(f"  {r['layer']:>5}  {r['fast_vs_hf_sdpa']:>15.3e}   {r['hf_eager_vs_hf_sdpa']:>19.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
