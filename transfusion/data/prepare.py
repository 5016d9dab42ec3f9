"""The data stage's one function: raw sources -> image-caption splits + text splits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.config import DataConfig
from transfusion.data.scenes import compose_scenes
from transfusion.data.shards import read_shards, write_shards
from transfusion.data.sources import SPLITS, load_caption_folder, load_mnist, load_text_works
from transfusion.io import atomic_dir


@dataclass
class ImageSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    records: list[dict]  # {"caption", "content", ...} per image


@dataclass
class PreparedData:
    images: dict[str, ImageSplit]
    text: dict[str, dict[str, str]]  # split -> work name -> text

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for split in SPLITS:
            out[f"{split}_images"] = len(self.images[split].images)
            out[f"{split}_text_chars"] = sum(len(t) for t in self.text[split].values())
            out[f"{split}_text_works"] = len(self.text[split])
        return out


def prepare_data(cfg: DataConfig, cache: Path) -> PreparedData:
    """Build every split in memory, deterministically from ``cfg.seed``."""
    text = load_text_works(cfg.text, cache, cfg.seed)
    if cfg.source == "caption_folder":
        return PreparedData(_split_caption_folder(cfg), text)
    mnist = load_mnist(cfg.mnist, cache)
    sizes = {"train": cfg.scenes.n_train, "val": cfg.scenes.n_val, "test": cfg.scenes.n_test}
    images = {}
    for k, split in enumerate(SPLITS):  # test scenes use MNIST test digits only, etc.
        imgs, recs = compose_scenes(mnist[split], sizes[split], cfg.scenes, seed=cfg.seed * 1000 + k)
        images[split] = ImageSplit(imgs, recs)
    return PreparedData(images, text)


def _split_caption_folder(cfg: DataConfig) -> dict[str, ImageSplit]:
    images, records = load_caption_folder(Path(cfg.caption_folder), cfg.scenes.canvas)  # type: ignore[arg-type]
    order = np.random.default_rng(cfg.seed).permutation(len(images))
    n_test = max(1, round(len(images) * cfg.caption_folder_test_fraction))
    n_val = max(1, round(len(images) * cfg.caption_folder_val_fraction))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {s: ImageSplit(images[idx], [records[i] for i in idx]) for s, idx in parts.items()}


def save_data(data: PreparedData, scenes_dir: Path, text_dir: Path, shard_size: int) -> None:
    """Write image splits as shards and text splits as ``<split>.txt`` (+ ``works.json``)."""
    with atomic_dir(scenes_dir) as tmp:
        for split in SPLITS:
            part = data.images[split]
            write_shards(tmp / split, "images", part.images, part.records, shard_size)
    with atomic_dir(text_dir) as tmp:
        for split in SPLITS:
            (tmp / f"{split}.txt").write_text("\n\n".join(data.text[split].values()))
        works = {s: sorted(data.text[s]) for s in SPLITS}
        (tmp / "works.json").write_text(json.dumps(works, indent=2) + "\n")


def load_image_split(scenes_dir: Path, split: str) -> ImageSplit:
    images, records = read_shards(Path(scenes_dir) / split, "images")
    return ImageSplit(images, records)


def read_text_split(text_dir: Path, split: str) -> str:
    return (Path(text_dir) / f"{split}.txt").read_text()
