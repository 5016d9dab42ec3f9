"""Latents <-> transformer vectors: linear patches or U-Net down/up blocks (paper §3.2).

Both encoders map scaled latents (N, C, H, W) and a time embedding (N, D) to patch vectors
(N, P, D) in raster order, P = (H/p) * (W/p), adding the time embedding to every patch vector
when ``add_time`` (the paper's conditioning; off when a separate time token carries it). The
U-Net's ResNet blocks are time-conditioned either way. Both decoders map the transformer's outputs at
those positions back to (N, C, H, W), the diffusion prediction. The U-Net pair shares skip
connections (the encoder returns them, the decoder consumes them) unless ``skips`` is off: then
the decoder sees the transformer's outputs and the time alone, and the image cannot route around
the transformer (docs/recipe.md: with skips, a tiny model's decoder denoises nearly as well with
the transformer's outputs zeroed).
"""

from __future__ import annotations

import torch
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, C * p * p), patches in raster order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """(N, H/p * W/p, C * p * p) -> (N, C, H, W); the inverse of :func:`patchify`."""
    n = x.shape[0]
    x = x.reshape(n, h // p, w // p, c, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


class LinearPatchEncoder(nn.Module):
    def __init__(self, channels: int, patch_size: int, hidden: int) -> None:
        super().__init__()
        self.p = patch_size
        self.proj = nn.Linear(channels * patch_size**2, hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, add_time: bool) -> tuple[torch.Tensor, list]:
        tokens = self.proj(patchify(x, self.p))  # (N, P, D)
        if add_time:
            tokens = tokens + temb[:, None, :]
        return tokens, []


class LinearPatchDecoder(nn.Module):
    def __init__(self, channels: int, patch_size: int, hidden: int, size: int) -> None:
        super().__init__()
        self.p, self.c, self.size = patch_size, channels, size
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, channels * patch_size**2)
        nn.init.zeros_(self.proj.weight)  # start by predicting zero (DiT's final layer init)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list) -> torch.Tensor:
        return unpatchify(self.proj(self.norm(h)), self.p, self.c, self.size, self.size)  # (N, C, H, W)


def _resnet(cin: int, cout: int, temb: int):
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D(
        in_channels=cin, out_channels=cout, temb_channels=temb, groups=_groups(cin), groups_out=_groups(cout)
    )


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class UNetPatchEncoder(nn.Module):
    """conv_in, then per level a time-conditioned ResNet block and a 2x downsample; each
    position of the last map becomes one patch vector (so patch_size = 2 ** levels), through
    GroupNorm + SiLU + a projection (the diffusers U-Nets' output head): without the norm the
    ResNet features reached token norms ~140 against ~9 for linear patches (docs/recipe.md)."""

    def __init__(self, channels: int, widths: list[int], hidden: int, skips: bool = True) -> None:
        from diffusers.models.downsampling import Downsample2D

        super().__init__()
        self.keep_skips = skips
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.blocks.append(_resnet(cin, w, hidden))
            self.downs.append(Downsample2D(w, use_conv=True, out_channels=w, padding=1))
            cin = w
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.proj = nn.Linear(widths[-1], hidden)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, add_time: bool) -> tuple[torch.Tensor, list]:
        h = self.conv_in(x)
        skips = []
        for block, down in zip(self.blocks, self.downs):
            h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = torch.nn.functional.silu(self.norm_out(h))
        tokens = self.proj(h.flatten(2).transpose(1, 2))  # (N, P, D) raster order
        if add_time:
            tokens = tokens + temb[:, None, :]
        return tokens, skips if self.keep_skips else []


class UNetPatchDecoder(nn.Module):
    """Mirror of the encoder: per level a 2x upsample, concat the skip (if any), a ResNet block."""

    def __init__(self, channels: int, widths: list[int], hidden: int, size: int, skips: bool = True) -> None:
        from diffusers.models.upsampling import Upsample2D

        super().__init__()
        self.size, self.levels = size, len(widths)
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, widths[-1])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        cin = widths[-1]
        for w in reversed(widths):
            self.ups.append(Upsample2D(cin, use_conv=True, out_channels=cin))
            self.blocks.append(_resnet(cin + (w if skips else 0), w, hidden))
            cin = w
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, skips: list) -> torch.Tensor:
        n, side = h.shape[0], self.size // 2**self.levels
        x = self.proj(self.norm(h)).transpose(1, 2).reshape(n, -1, side, side)
        skips = list(reversed(skips)) or [None] * self.levels
        for up, block, skip in zip(self.ups, self.blocks, skips):
            x = up(x)
            x = block(x if skip is None else torch.cat([x, skip], dim=1), temb)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(x)))  # (N, C, H, W)


def build_patching(
    kind: str, channels: int, size: int, patch_size: int, hidden: int, unet_channels: list[int], unet_skips: bool = True
):
    """(encoder, decoder) for ``kind`` in {"linear", "unet"}."""
    if kind == "linear":
        return LinearPatchEncoder(channels, patch_size, hidden), LinearPatchDecoder(channels, patch_size, hidden, size)
    return (
        UNetPatchEncoder(channels, unet_channels, hidden, unet_skips),
        UNetPatchDecoder(channels, unet_channels, hidden, size, unet_skips),
    )
