"""The data stage's one function: raw sources -> image-caption splits + text splits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.config import DataConfig
from transfusion.data.scenes import compose_scenes
from transfusion.data.shards import ShardWriter, read_shards, write_shards
from transfusion.data.sources import SPLITS, load_caption_folder, load_mnist, load_text_works
from transfusion.data.streams import BadRecords, iter_records, shown, split_of, usable
from transfusion.errors import DataError
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
        return {f"{s}_images": len(self.images[s].images) for s in SPLITS} | text_stats(self.text)


def text_stats(text: dict[str, dict[str, str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in SPLITS:
        out[f"{split}_text_chars"] = sum(len(t) for t in text[split].values())
        out[f"{split}_text_works"] = len(text[split])
    return out


def prepare_data(cfg: DataConfig, cache: Path) -> PreparedData:
    """Build every split in memory, deterministically from ``cfg.seed`` (MNIST scenes, a caption
    folder; a streamed source goes through ``save_stream`` instead)."""
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
    n_test = max(1, round(len(images) * cfg.test_fraction))
    n_val = max(1, round(len(images) * cfg.val_fraction))
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {s: ImageSplit(images[idx], [records[i] for i in idx]) for s, idx in parts.items()}


@dataclass
class StreamReport:
    """What ``save_stream`` read and wrote."""

    images: dict[str, int]  # split -> images written
    read: int  # records read
    bad: BadRecords
    seconds: float

    def stats(self) -> dict[str, float]:
        return {f"{s}_images": self.images[s] for s in SPLITS} | {
            "records_read": self.read,
            "bad_records": self.bad.count,
            "bad_fraction": self.bad.count / max(self.read, 1),
            "images_per_s": sum(self.images.values()) / max(self.seconds, 1e-9),
        }


def save_stream(cfg: DataConfig, scenes_dir: Path) -> StreamReport:
    """Stream ``cfg.stream``'s records into scene-layout shards of ``cfg.scenes.canvas`` pixels,
    split by key hash, with at most one shard per split in memory. Bad records are skipped and
    counted; more than ``cfg.max_bad_fraction`` of them (or an empty split) is a ``DataError``."""
    import time

    bad, read, start = BadRecords(), 0, time.perf_counter()
    with atomic_dir(scenes_dir) as tmp:
        writers = {s: ShardWriter(tmp / s, "images", cfg.scenes.shard_size) for s in SPLITS}

        def counted(records):
            nonlocal read
            for record in records:
                read += 1
                yield record

        for record, pixels in usable(counted(iter_records(cfg, bad)), cfg.scenes.canvas, bad):
            split = split_of(record.key, cfg.val_fraction, cfg.test_fraction)
            writers[split].add(pixels, {"caption": record.caption, "content": None, "source": record.key})
        images = {s: w.close() for s, w in writers.items()}
        bad.check(read, cfg.max_bad_fraction, f"data.stream.urls {[shown(u) for u in cfg.stream.urls]}")
        empty = [s for s in SPLITS if not images[s]]
        if empty:
            raise DataError(f"data.stream.urls: {read} records leave {empty} empty (data.val_fraction / test_fraction)")
    return StreamReport(images, read, bad, time.perf_counter() - start)


def save_images(data: PreparedData, scenes_dir: Path, shard_size: int) -> None:
    """Write the image splits as shards."""
    with atomic_dir(scenes_dir) as tmp:
        for split in SPLITS:
            part = data.images[split]
            write_shards(tmp / split, "images", part.images, part.records, shard_size)


def save_text(text: dict[str, dict[str, str]], text_dir: Path) -> None:
    """Write the text splits as ``<split>.txt`` (+ ``works.json``)."""
    with atomic_dir(text_dir) as tmp:
        for split in SPLITS:
            (tmp / f"{split}.txt").write_text("\n\n".join(text[split].values()))
        works = {s: sorted(text[s]) for s in SPLITS}
        (tmp / "works.json").write_text(json.dumps(works, indent=2) + "\n")


def load_image_split(scenes_dir: Path, split: str, limit: int | None = None) -> ImageSplit:
    """A split in memory (its first ``limit`` images: a large streamed set's train split)."""
    images, records = read_shards(Path(scenes_dir) / split, "images", limit)
    return ImageSplit(images, records)


def read_text_split(text_dir: Path, split: str) -> str:
    return (Path(text_dir) / f"{split}.txt").read_text()
