"""The DFlash training objective: anchors, block inputs, the block mask and the decay-weighted loss.

One `mask_mod` drives both attention paths: FlexAttention's block mask on GPU and a dense boolean mask for SDPA on
CPU. Query q belongs to block q // block_size; keys are [target context (S); block tokens (N * block_size)].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator):
    """(anchors, keep), both (B, N): N anchor slots per row sampled uniformly without replacement from positions p
    where the loss mask is set at p and at p + 1, as SpecForge's current DFlash trainer samples them
    (specforge/algorithms/common/dflash_family_model.py, `_sample_anchor_positions`). A block may run past the end
    of its row: `build_blocks` gives the positions past the end zero weight. Slots beyond the number of valid
    positions get keep=False (and anchor 0)."""
    b, s = loss_mask.shape
    lm = loss_mask.bool()
    valid = torch.zeros_like(lm)
    valid[:, :-1] = lm[:, :-1] & lm[:, 1:]
    score = torch.rand(b, s, generator=generator, device="cpu").to(loss_mask.device)
    score = torch.where(valid, score, torch.full_like(score, -1.0))
    n = min(num_anchors, s)
    top, idx = score.topk(n, dim=1)
    keep = top >= 0
    anchors = torch.where(keep, idx, torch.zeros_like(idx))
    if n < num_anchors:
        pad = num_anchors - n
        anchors = F.pad(anchors, (0, pad))
        keep = F.pad(keep, (0, pad), value=False)
    order = torch.where(keep, anchors, torch.full_like(anchors, s)).argsort(dim=1)
    return anchors.gather(1, order), keep.gather(1, order)


@dataclass
class Blocks:
    input_ids: torch.Tensor   # (B, N*bs) anchor token then mask tokens
    positions: torch.Tensor   # (B, N*bs) absolute positions anchor + k
    labels: torch.Tensor      # (B, N*bs) token at anchor + k
    weights: torch.Tensor     # (B, N*bs) exp(-(k-1)/gamma) * loss_mask * keep for k >= 1, else 0
    k: torch.Tensor           # (N*bs,) position inside the block


def build_blocks(input_ids, loss_mask, anchors, keep, block_size: int, mask_token_id: int, gamma: float) -> Blocks:
    """Block inputs, positions, labels and weights; label positions past the row (or the padded batch) get weight 0
    (SpecForge: the same file, `forward`'s weight mask)."""
    b, s = input_ids.shape
    n = anchors.shape[1]
    k = torch.arange(block_size, device=input_ids.device).repeat(n)                     # (N*bs,)
    positions = anchors.repeat_interleave(block_size, dim=1) + k[None]                  # (B, N*bs)
    gather_pos = positions.clamp(max=s - 1)
    labels = input_ids.gather(1, gather_pos)
    block_ids = torch.where(k[None] == 0, labels, torch.full_like(labels, mask_token_id))
    decay = torch.exp(-(k.float() - 1) / gamma) * (k >= 1)
    in_range = positions < s
    weights = decay[None] * loss_mask.gather(1, gather_pos).float() * in_range \
        * keep.repeat_interleave(block_size, dim=1)
    return Blocks(block_ids, positions, labels, weights, k)


def mask_mod_for(anchors: torch.Tensor, context_len: int, block_size: int):
    """mask_mod(b, h, q, kv) -> bool: context key kv < S is visible iff kv < anchor of q's block; block keys are
    visible iff they belong to q's own block (bidirectional inside the block, never other blocks)."""

    def mask_mod(b, h, q_idx, kv_idx):
        blk = q_idx // block_size
        is_ctx = kv_idx < context_len
        ctx_ok = is_ctx & (kv_idx < anchors[b, blk])
        own = (~is_ctx) & ((kv_idx - context_len) // block_size == blk)
        return ctx_ok | own

    return mask_mod


def dense_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """(B, 1, Q, S + Q) bool mask for SDPA, from the same mask_mod."""
    b, n = anchors.shape
    q_len = n * block_size
    dev = anchors.device
    mm = mask_mod_for(anchors, context_len, block_size)
    return mm(torch.arange(b, device=dev)[:, None, None, None], None,
              torch.arange(q_len, device=dev)[None, None, :, None],
              torch.arange(context_len + q_len, device=dev)[None, None, None, :])


def block_loss(logits: torch.Tensor, blocks: Blocks, block_size: int) -> dict:
    """Decay-weighted cross entropy: `loss_sum` (sum of weight x CE, SpecForge's `loss_terms` numerator),
    `weight_sum` (its denominator) and `loss` (their ratio, the micro-batch's weighted mean); accuracy overall and
    per block position."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), blocks.labels.flatten(), reduction="none").view_as(blocks.labels)
    w = blocks.weights
    wsum = w.sum()
    loss_sum = (ce * w).sum()
    loss = loss_sum / wsum.clamp(min=1e-9)
    counted = w > 0
    correct = (logits.argmax(-1) == blocks.labels) & counted
    per_k_n = torch.zeros(block_size, device=w.device).index_add_(0, blocks.k, counted.sum(0).float())
    per_k_c = torch.zeros(block_size, device=w.device).index_add_(0, blocks.k, correct.sum(0).float())
    return {"loss": loss, "loss_sum": loss_sum, "weight_sum": wsum.detach(), "correct": correct.sum().detach(),
            "counted": counted.sum().detach(), "per_k_correct": per_k_c.detach(), "per_k_counted": per_k_n.detach()}


def _ce_chunk(h, weight, y, coef):
    """(sum of coef * CE, argmax == y, d loss / d h) for one chunk of rows."""
    logits = (h @ weight.T).float()
    lse = torch.logsumexp(logits, -1)
    c = coef.float()
    loss = ((lse - logits.gather(1, y[:, None]).squeeze(1)) * c).sum()
    probs = torch.exp(logits - lse[:, None])
    probs.scatter_add_(1, y[:, None], -torch.ones_like(probs[:, :1]))
    grad = ((probs * c[:, None]).to(weight.dtype) @ weight).to(h.dtype)
    return loss, logits.argmax(-1) == y, grad


@functools.cache
def _compiled_chunk():
    """On GPU the elementwise work over the (chunk, vocab) logits is fused by the compiler (one compile per shape)."""
    return torch.compile(_ce_chunk, dynamic=False)


class _FusedLinearCE(torch.autograd.Function):
    """sum_i coef_i * CE(h_i @ W^T, y_i) for a frozen W, one chunk of logits at a time.

    The gradient w.r.t. h is computed in the forward pass (W is frozen, coef is known), so the full (N, V) logits
    are never stored: memory is one chunk of logits. Also returns, per row, whether argmax == label.
    """

    @staticmethod
    def forward(ctx, h, weight, labels, coef, chunk):
        grad = torch.empty_like(h)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        correct = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
        step = _compiled_chunk() if h.is_cuda else _ce_chunk
        for a in range(0, h.shape[0], chunk):
            part_loss, correct[a:a + chunk], grad[a:a + chunk] = step(h[a:a + chunk], weight, labels[a:a + chunk],
                                                                      coef[a:a + chunk])
            loss += part_loss
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def fused_block_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, blocks: Blocks, block_size: int,
                     chunk: int = 4096) -> dict:
    """block_loss with the frozen LM head fused into the loss (no full-vocab logits kept); same outputs."""
    w = blocks.weights
    wsum = w.sum()
    loss_sum, correct = _FusedLinearCE.apply(hidden.flatten(0, 1), lm_weight, blocks.labels.flatten(), w.flatten(),
                                             chunk)
    loss = loss_sum / wsum.clamp(min=1e-9)
    counted = w > 0
    correct = correct.view_as(w) & counted
    per_k_n = torch.zeros(block_size, device=w.device).index_add_(0, blocks.k, counted.sum(0).float())
    per_k_c = torch.zeros(block_size, device=w.device).index_add_(0, blocks.k, correct.sum(0).float())
    return {"loss": loss, "loss_sum": loss_sum, "weight_sum": wsum.detach(), "correct": correct.sum().detach(),
            "counted": counted.sum().detach(), "per_k_correct": per_k_c.detach(), "per_k_counted": per_k_n.detach()}
