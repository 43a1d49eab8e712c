"""`tokens.pt`, the tokenize stage's output: flat `input_ids` (int32) and `loss_mask` (bool) with `offsets` (n + 1,)
marking one row per conversation."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = "tokens.pt"


def save_tokens(directory: Path, ids: list[int], masks: list[bool], offsets: list[int]) -> None:
    torch.save({"input_ids": torch.tensor(ids, dtype=torch.int32), "loss_mask": torch.tensor(masks),
                "offsets": torch.tensor(offsets, dtype=torch.long)}, Path(directory) / TOKENS)


def load_tokens(directory: Path) -> dict:
    return torch.load(Path(directory) / TOKENS)
