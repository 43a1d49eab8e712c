"""An untied LM head trained on the rows of the pretraining corpus's tokens only (the qwen3_offline target's)."""

from __future__ import annotations

import math

import torch


class CorpusRows(torch.nn.Module):
    """The trainable rows of an untied LM head for the tokens of the pretraining corpus; every other row stays zero.

    The full-vocabulary cross entropy is then exact and cheap: each absent token has logit 0, so the log-partition
    is logsumexp(corpus logits, log(V - |corpus tokens|)). With Qwen3's 151,936 rows and a synthetic corpus of about
    two thousand distinct tokens this (and a frozen input embedding, see `training.target_pretrain.pretrain`) keeps
    pretraining at CPU speed."""

    def __init__(self, lm_head: torch.nn.Linear, used: list[int]):
        super().__init__()
        rows = lm_head.weight.shape[0]
        self.register_buffer("used", torch.tensor(used))
        self.register_buffer("index", torch.full((rows,), -1).index_copy_(0, self.used, torch.arange(len(used))))
        self.weight = torch.nn.Parameter(lm_head.weight.detach()[self.used].clone())
        self.rest = math.log(rows - len(used))

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        z = model.model(input_ids=batch).last_hidden_state[:, :-1] @ self.weight.T
        lse = torch.logsumexp(torch.cat([z, z.new_full((*z.shape[:-1], 1), self.rest)], -1), -1)
        return (lse - z.gather(-1, self.index[batch[:, 1:]][..., None]).squeeze(-1)).mean()

    def write(self, lm_head: torch.nn.Linear) -> None:
        with torch.no_grad():
            lm_head.weight.zero_()
            lm_head.weight[self.used] = self.weight
