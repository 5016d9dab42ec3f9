"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay to a
floor (``min_ratio`` of the peak), as the paper's AdamW recipe."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The multiplier of the peak lr after ``step`` scheduler steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    """A ``LambdaLR`` over :func:`warmup_cosine_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup, total, min_ratio))
