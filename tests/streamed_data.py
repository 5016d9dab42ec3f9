"""Generated image-caption datasets in the layouts teams bring: WebDataset tar shards and Parquet
files (Hugging Face datasets' image struct), with corrupt records where asked, and a small
diffusers AutoencoderKL saved as a team's pretrained VAE would be."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("square", "disc")


def picture(i: int, size: int) -> tuple[np.ndarray, str]:
    """Image ``i``: a coloured square or disc on grey, at a position, and its caption."""
    rng = np.random.default_rng(i)
    name = list(COLOURS)[i % len(COLOURS)]
    shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    img = np.full((size, size, 3), 90, np.uint8)
    r = size // 4
    cy, cx = rng.integers(r, size - r, 2)
    yy, xx = np.mgrid[:size, :size]
    inside = (abs(yy - cy) < r) & (abs(xx - cx) < r) if shape == "square" else (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[inside] = COLOURS[name]
    return img, f"a {name} {shape}"


def encoded(img: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_webdataset(folder: Path, n: int, size: int = 64, per_shard: int = 100, bad: tuple[int, ...] = ()) -> Path:
    """``folder/shard-00000.tar`` ...: KEY.png + KEY.txt (every third caption as KEY.json).
    Records in ``bad`` are corrupt: even ones an undecodable image, odd ones no caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                img, caption = picture(i, size)
                key = f"sample{i:07d}"
                _add(tar, f"{key}.png", b"not a png" if i in bad and i % 2 == 0 else encoded(img))
                if i in bad and i % 2:
                    continue
                if i % 3:
                    _add(tar, f"{key}.txt", caption.encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"txt": caption, "id": i}).encode())
    return folder


def make_parquet(folder: Path, n: int, size: int = 64, per_file: int = 100, bad: tuple[int, ...] = ()) -> Path:
    """``folder/train-00000.parquet`` ...: Hugging Face datasets' layout, an ``image`` struct
    {bytes, path} and a ``text`` column. Records in ``bad``: broken bytes (even) or no text (odd)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, n, per_file)):
        images, texts = [], []
        for i in range(start, min(start + per_file, n)):
            img, caption = picture(i, size)
            broken = i in bad and i % 2 == 0
            images.append({"bytes": b"\x89PNG broken" if broken else encoded(img), "path": f"{i}.png"})
            texts.append(None if i in bad and i % 2 else caption)
        pq.write_table(pa.table({"image": images, "text": texts}), folder / f"train-{f:05d}.parquet")
    return folder


def save_pretrained_vae(folder: Path, scaling_factor: float = 0.5) -> Path:
    """A small diffusers AutoencoderKL (3 blocks: downsampling 4) saved with safetensors."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder
