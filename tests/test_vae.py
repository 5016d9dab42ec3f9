"""VAE: shapes from params, save/load identity, training lowers the loss, clear load errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import section
from transfusion.vae import build_vae, decode, encode, load_vae, psnr, to_tensor, to_uint8, train_vae

TINY = dict(block_out_channels=[8, 16, 16], norm_num_groups=8, batch_size=8, warmup_steps=2, log_every=5, bf16=False)


def images(n: int = 32, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - 8, size=2)
        out[i, r : r + 8, c : c + 8] = rng.integers(50, 255, size=3)
    return out


def test_latent_shape_follows_params():
    vae = build_vae(section("vae", **TINY, latent_channels=4), image_size=32)
    assert encode(vae, images(4)).shape == (4, 4, 8, 8)
    two_blocks = section("vae", **{**TINY, "block_out_channels": [8, 16]}, downsample=2, latent_channels=3)
    vae2 = build_vae(two_blocks, image_size=32)
    assert encode(vae2, images(4)).shape == (4, 3, 16, 16)


def test_save_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(section("vae", **TINY), image_size=32)
    vae.save_pretrained(str(tmp_path), safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_vae(tmp_path)
    x = images(6)
    z1, z2 = encode(vae, x), encode(loaded, x)
    assert torch.equal(z1, z2)
    np.testing.assert_array_equal(decode(vae, z1), decode(loaded, z2))


def test_training_lowers_reconstruction_error():
    torch.manual_seed(0)
    x = images(64)
    vae = build_vae(section("vae", **TINY), image_size=32)
    before = psnr(x, decode(vae, encode(vae, x)))
    history = train_vae(vae, x, section("vae", **TINY, steps=40, lr=3e-3))
    after = psnr(x, decode(vae, encode(vae, x)))
    assert history[-1].mse < 0.5 * history[0].mse
    assert after > before + 3
    assert [h.step for h in history] == list(range(5, 41, 5))


def test_pixel_conversions_and_psnr():
    x = images(3)
    np.testing.assert_array_equal(to_uint8(to_tensor(x)), x)
    assert psnr(x, x) == float("inf")
    off = x.astype(np.int16) + 1
    assert psnr(x, np.clip(off, 0, 255).astype(np.uint8)) == pytest.approx(48.13, abs=0.05)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved VAE"):
        load_vae(tmp_path)
    vae = build_vae(section("vae", **TINY), image_size=32)
    vae.save_pretrained(str(tmp_path), safe_serialization=True)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load the VAE") as err:
        load_vae(tmp_path)
    assert "\n" not in str(err.value)
