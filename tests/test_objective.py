"""The training objective against a slow loop-based reference: mask, labels, weights, loss."""

import math

import torch
import torch.nn.functional as F

from dflash.modeling import objective


def reference(input_ids, loss_mask, anchors, keep, bs, mask_id, gamma, logits):
    b, s = input_ids.shape
    n = anchors.shape[1]
    q = n * bs
    mask = torch.zeros(b, 1, q, s + q, dtype=torch.bool)
    ids = torch.zeros(b, q, dtype=torch.long)
    labels = torch.zeros(b, q, dtype=torch.long)
    weights = torch.zeros(b, q)
    for bi in range(b):
        for j in range(n):
            a = int(anchors[bi, j])
            for k in range(bs):
                qi = j * bs + k
                ids[bi, qi] = input_ids[bi, a] if k == 0 else mask_id
                p = a + k
                if p < s:
                    labels[bi, qi] = input_ids[bi, p]
                if k >= 1 and p < s and loss_mask[bi, p] and keep[bi, j]:
                    weights[bi, qi] = math.exp(-(k - 1) / gamma)
                for kv in range(s + q):
                    if kv < s:
                        mask[bi, 0, qi, kv] = kv < a          # context strictly before the anchor
                    else:
                        mask[bi, 0, qi, kv] = (kv - s) // bs == j   # own block, both directions
    num, den = 0.0, 0.0
    for bi in range(b):
        for qi in range(q):
            if weights[bi, qi] > 0:
                ce = -F.log_softmax(logits[bi, qi], -1)[labels[bi, qi]]
                num += weights[bi, qi] * ce
                den += weights[bi, qi]
    return mask, ids, labels, weights, num / den


def _batch(seed=0, b=2, s=40, vocab=50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    loss_mask = torch.zeros(b, s, dtype=torch.bool)
    loss_mask[0, 10:] = True
    loss_mask[1, 5:30] = True
    return ids, loss_mask, torch.tensor([s, 30])      # row 1 is 30 tokens long (padded to 40)


def test_fast_path_matches_reference():
    ids, lmask, lens = _batch()
    bs, n, mask_id, gamma = 4, 6, 99, 7.0
    anchors, keep = objective.sample_anchors(lmask, n, torch.Generator().manual_seed(1))
    blocks = objective.build_blocks(ids, lmask, anchors, keep, bs, mask_id, gamma)
    logits = torch.randn(2, n * bs, 100, generator=torch.Generator().manual_seed(2))
    ref_mask, ref_ids, ref_labels, ref_w, ref_loss = reference(ids, lmask, anchors, keep, bs, mask_id, gamma, logits)
    assert torch.equal(objective.dense_mask(anchors, ids.shape[1], bs), ref_mask)
    assert torch.equal(blocks.input_ids, ref_ids)
    valid = ref_w > 0
    assert torch.equal(blocks.labels[valid], ref_labels[valid])
    assert torch.allclose(blocks.weights, ref_w)
    res = objective.block_loss(logits, blocks, bs)
    assert torch.allclose(res["loss"], torch.as_tensor(ref_loss, dtype=torch.float32), atol=1e-5)


def test_anchors_need_the_loss_mask_at_p_and_p_plus_1():
    """SpecForge's rule (dflash_family_model.py `_sample_anchor_positions`): p and p + 1 supervised; no room for a
    whole block is needed."""
    _, lmask, _ = _batch()
    anchors, keep = objective.sample_anchors(lmask, 64, torch.Generator().manual_seed(0))
    for b in range(2):
        kept = anchors[b][keep[b]].tolist()
        assert len(set(kept)) == len(kept)                                  # without replacement
        assert all(lmask[b, a] and lmask[b, a + 1] for a in kept)
    # row 0: loss positions 10..39 of 40 -> anchors 10..38 (29); row 1: loss 5..29 -> anchors 5..28 (24), all taken
    assert anchors[0][keep[0]].tolist() == list(range(10, 39)) and anchors[1][keep[1]].tolist() == list(range(5, 29))


def test_blocks_run_past_the_row_end_with_zero_weight():
    """An anchor two tokens before the end of a row (padded batch) and of the batch: the block's positions past the
    row's last loss token get weight 0, the ones inside keep their decay weight."""
    ids, lmask, _ = _batch()
    bs, gamma = 8, 7.0
    anchors, keep = torch.tensor([[38], [28]]), torch.tensor([[True], [True]])
    blocks = objective.build_blocks(ids, lmask, anchors, keep, bs, 99, gamma)
    decay = [math.exp(-(k - 1) / gamma) for k in range(1, bs)]
    assert blocks.positions[0].tolist() == list(range(38, 46)) and blocks.positions[1].tolist() == list(range(28, 36))
    assert torch.allclose(blocks.weights[0], torch.tensor([0.0, decay[0], *[0.0] * 6]))    # only 39 inside
    assert torch.allclose(blocks.weights[1], torch.tensor([0.0, decay[0], *[0.0] * 6]))    # 29 is the last loss token
    assert blocks.labels[0, 1] == ids[0, 39] and blocks.labels[1, 1] == ids[1, 29]
    logits = torch.randn(2, bs, 100, generator=torch.Generator().manual_seed(0))
    *_, ref_loss = reference(ids, lmask, anchors, keep, bs, 99, gamma, logits)
    assert torch.allclose(objective.block_loss(logits, blocks, bs)["loss"], torch.as_tensor(ref_loss).float())


def test_anchors_resampled_per_seed_and_deterministic():
    _, lmask, lens = _batch()
    a1, _ = objective.sample_anchors(lmask, 5, torch.Generator().manual_seed(3))
    a2, _ = objective.sample_anchors(lmask, 5, torch.Generator().manual_seed(3))
    a3, _ = objective.sample_anchors(lmask, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_no_valid_anchor_gives_zero_weight():
    ids = torch.zeros(1, 10, dtype=torch.long)
    lmask = torch.zeros(1, 10, dtype=torch.bool)
    anchors, keep = objective.sample_anchors(lmask, 4, torch.Generator().manual_seed(0))
    blocks = objective.build_blocks(ids, lmask, anchors, keep, 4, 1, 7.0)
    assert not keep.any() and blocks.weights.sum() == 0


def test_fused_lm_head_loss_matches_plain_loss_and_grads():
    ids, lmask, lens = _batch(seed=5)
    bs, n = 4, 6
    anchors, keep = objective.sample_anchors(lmask, n, torch.Generator().manual_seed(0))
    blocks = objective.build_blocks(ids, lmask, anchors, keep, bs, 99, 7.0)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(100, 16, generator=g)
    h1 = torch.randn(2, n * bs, 16, generator=g, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    plain = objective.block_loss(h1 @ weight.T, blocks, bs)
    fused = objective.fused_block_loss(h2, weight, blocks, bs, chunk=7)
    plain["loss"].backward()
    fused["loss"].backward()
    assert torch.allclose(plain["loss"], fused["loss"], atol=1e-5)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    for k in ("correct", "counted", "per_k_correct", "per_k_counted"):
        assert torch.equal(plain[k], fused[k])
