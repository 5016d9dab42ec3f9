"""The image autoencoder: diffusers' ``AutoencoderKL`` built from params and trained from scratch,
or a team's own pretrained one (``vae.pretrained``: a local diffusers folder).

Images enter as (B, 3, H, W) floats in [-1, 1]; latents are (B, C, H/f, W/f) with f the
downsampling factor (2 ** (blocks - 1)). Training minimises the mean squared reconstruction error
plus ``kl_weight`` times the KL of the diagonal Gaussian posterior to N(0, I).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transfusion.config import VAEConfig
from transfusion.errors import BadInput, MissingInput
from transfusion.optim import warmup_cosine


def build_vae(cfg: VAEConfig, image_size: int, channels: int = 3):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=cfg.mid_block_attention,
    )


def load_vae(path: Path, hint: str = "run the vae stage first"):
    """``AutoencoderKL.from_pretrained`` on a local folder (safetensors only), in eval mode."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingInput(f"{path}: not a saved VAE (no config.json); {hint}")
    try:
        vae = AutoencoderKL.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise BadInput(f"{path}: cannot load the VAE ({str(err).splitlines()[0]})") from None
    return vae.eval()


def load_pretrained(cfg: VAEConfig, canvas: int):
    """``vae.pretrained`` loaded and checked against the params: an RGB AutoencoderKL whose
    blocks downsample by ``vae.downsample`` (one line naming the keys otherwise)."""
    path = cfg.pretrained
    vae = load_vae(path, "vae.pretrained must be a local diffusers AutoencoderKL folder")
    config = vae.config
    down = 2 ** (len(config.block_out_channels) - 1)
    if down != cfg.downsample:
        raise BadInput(
            f"vae.pretrained: {path} downsamples by {down} ({len(config.block_out_channels)} blocks), "
            f"but vae.downsample is {cfg.downsample}"
        )
    if config.in_channels != 3 or config.out_channels != 3:
        raise BadInput(f"vae.pretrained: {path} maps {config.in_channels} -> {config.out_channels} channels, not RGB")
    return vae


def computed_scaling_factor(vae, images: np.ndarray, batch_size: int = 256) -> float:
    """1 / std of the posterior means of ``images``: the factor that gives unit-variance latents."""
    return float(1.0 / encode(vae, images, batch_size).std())


# ---------------------------------------------------------------------------------------------
# pixels <-> tensors
# ---------------------------------------------------------------------------------------------
def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 image arrays (over all pixels)."""
    mse = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2) / 255.0**2
    return float("inf") if mse == 0 else float(10 * math.log10(1.0 / mse))


def autocast(enabled: bool, device: torch.device | str = "cpu"):
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, reconstruction MSE, KL per latent element) for a batch ``x`` (B, 3, H, W)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    recon = vae.decode(z).sample
    mse = F.mse_loss(recon.float(), x)
    kl = posterior.kl().mean() / z[0].numel()
    return mse + kl_weight * kl, mse, kl


@dataclass
class VAELog:
    step: int
    loss: float
    mse: float
    kl: float
    lr: float


def train_vae(
    vae,
    images: np.ndarray,
    cfg: VAEConfig,
    on_log: Callable[[VAELog], None] | None = None,
) -> list[VAELog]:
    """Train ``vae`` in place on uint8 ``images`` (N, H, W, 3); returns the logged curve."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = to_tensor(images)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    history: list[VAELog] = []
    running = np.zeros(3)
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        x = data[idx]
        with autocast(cfg.bf16):
            loss, mse, kl = vae_loss(vae, x, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        running += [loss.item(), mse.item(), kl.item()]
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            entry = VAELog(step, *(running / n), lr=sched.get_last_lr()[0])
            running[:] = 0
            history.append(entry)
            if on_log is not None:
                on_log(entry)
    vae.eval()
    return history


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
def _in_batches(fn, items, batch_size: int, bf16: bool) -> list:
    """``fn`` over ``items`` in slices of ``batch_size`` (under bf16 autocast when asked)."""
    out = []
    for start in range(0, len(items), batch_size):
        with autocast(bf16):
            out.append(fn(items[start : start + batch_size]))
    return out


@torch.no_grad()
def encode(vae, images: np.ndarray, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> posterior means (N, C, h, w) float32."""
    vae.eval()
    posterior_mean = lambda x: vae.encode(to_tensor(x).to(vae.device)).latent_dist.mean.float().cpu()  # noqa: E731
    return torch.cat(_in_batches(posterior_mean, images, batch_size, bf16))


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 256, bf16: bool = False) -> np.ndarray:
    """Unscaled latents (N, C, h, w) -> uint8 images (N, H, W, 3)."""
    vae.eval()
    pixels = lambda z: to_uint8(vae.decode(z.float().to(vae.device)).sample)  # noqa: E731
    return np.concatenate(_in_batches(pixels, latents, batch_size, bf16))


def reconstruct(vae, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return decode(vae, encode(vae, images, batch_size), batch_size)
