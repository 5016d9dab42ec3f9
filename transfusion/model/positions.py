"""Absolute positions of an image's patches: which cell of the latent grid each patch is.

Inside an image block attention is bidirectional, so every patch sees the same tokens and the
backbone's 1-D RoPE only shapes *how* patches attend to each other; nothing in a patch's own
vector says where it sits (under causal attention the length of its prefix would). These tables
add that, one (P, D) row per patch in raster order:

- ``none``: RoPE only (the behaviour of models saved before the option).
- ``learned``: one trained vector per patch index, GPT-2's ``wpe`` init (std 0.02).
- ``learned_2d``: a trained row vector plus a trained column vector, started at the 2-D
  sin-cos table below (so it begins at a useful scale and can be tuned from there).
- ``sincos_2d``: DiT's fixed 2-D sin-cos table (``diffusers``' ``get_2d_sincos_pos_embed``):
  half the channels encode the column, half the row.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("none", "learned", "learned_2d", "sincos_2d")


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """DiT's fixed table for a ``side`` x ``side`` grid -> (side * side, dim), raster order."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(dim, side, base_size=side, output_type="pt")
    return torch.as_tensor(table, dtype=torch.float32)


class PatchPositions(nn.Module):
    """``forward()`` -> the (1, P, D) table added to a batch's patch vectors (N, P, D)."""

    def __init__(self, kind: str, dim: int, side: int) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"patch_positions {kind!r} is not one of {KINDS}")
        self.kind, self.side = kind, side
        if kind == "learned":  # GPT-2's wpe init
            self.table = nn.Parameter(torch.randn(1, side * side, dim) * 0.02)
        elif kind == "learned_2d":
            grid = sincos_2d(dim, side).view(side, side, dim)  # (row, col, D)
            self.rows = nn.Parameter(torch.zeros(side, dim))
            self.cols = nn.Parameter(torch.zeros(side, dim))
            with torch.no_grad():  # the sin-cos table's first half encodes the column, its second the row
                self.cols[:, : dim // 2] = grid[0, :, : dim // 2]
                self.rows[:, dim // 2 :] = grid[:, 0, dim // 2 :]
        elif kind == "sincos_2d":
            self.register_buffer("table", sincos_2d(dim, side)[None], persistent=False)

    def forward(self) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self.kind == "learned_2d":
            return (self.rows[:, None, :] + self.cols[None, :, :]).flatten(0, 1)[None]  # (1, P, D)
        return self.table
