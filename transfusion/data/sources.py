"""Raw sources: MNIST digits (pinned archive, IDX folder or .npz), text works, caption folders.

Each loader returns plain numpy arrays / strings split into ``train``, ``val`` and ``test``.
"""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfusion.config import MnistConfig, TextConfig
from transfusion.data.archives import fetch_archive, load_numpy_pickle, read_members
from transfusion.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DigitSplit:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------
def load_mnist(cfg: MnistConfig, cache: Path) -> dict[str, DigitSplit]:
    """MNIST as 50k train / 10k val / 10k test (val carved from the end of train if absent)."""
    if cfg.local_path is not None:
        path = Path(cfg.local_path)
        return _load_mnist_npz(path) if path.is_file() else _load_mnist_idx(path)
    archive = fetch_archive(cfg.archive, cache)
    (blob,) = read_members(archive, cfg.archive.member).values()
    return _from_mnist_pickle(load_numpy_pickle(blob), archive)


def _digit_split(x: np.ndarray, y: np.ndarray, where: str) -> DigitSplit:
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
        raise DataError(f"{where}: expected (N, 28, 28) images with N labels, got {x.shape} / {np.shape(y)}")
    if x.dtype != np.uint8:  # floats in [0, 1]
        x = np.clip(np.rint(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    y = np.asarray(y).astype(np.int64)
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"{where}: labels must be digits 0-9")
    return DigitSplit(x, y)


def _from_mnist_pickle(obj: object, where: Path) -> dict[str, DigitSplit]:
    try:
        (xtr, ytr), (xva, yva), (xte, yte) = obj  # type: ignore[misc]
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected ((train_x, train_y), (val_x, val_y), (test_x, test_y))") from None
    return {
        "train": _digit_split(xtr, ytr, f"{where} train"),
        "val": _digit_split(xva, yva, f"{where} val"),
        "test": _digit_split(xte, yte, f"{where} test"),
    }


def _carve_val(x: np.ndarray, y: np.ndarray, n_val: int = 10000) -> tuple[DigitSplit, DigitSplit]:
    n_val = min(n_val, len(x) // 6)
    return DigitSplit(x[:-n_val], y[:-n_val]), DigitSplit(x[-n_val:], y[-n_val:])


def _load_mnist_npz(path: Path) -> dict[str, DigitSplit]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise DataError(f"{path}: not a readable .npz ({err})") from None
    need = {"x_train", "y_train", "x_test", "y_test"}
    if not need <= arrays.keys():
        raise DataError(f"{path}: expected arrays {sorted(need)} (+ optional x_val, y_val), got {sorted(arrays)}")
    train = _digit_split(arrays["x_train"], arrays["y_train"], f"{path} train")
    if "x_val" in arrays:
        val = _digit_split(arrays["x_val"], arrays["y_val"], f"{path} val")
    else:
        train, val = _carve_val(train.images, train.labels)
    return {"train": train, "val": val, "test": _digit_split(arrays["x_test"], arrays["y_test"], f"{path} test")}


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing MNIST IDX file {stem}[.gz]")


def _load_mnist_idx(folder: Path) -> dict[str, DigitSplit]:
    x = _read_idx(_find_idx(folder, "train-images-idx3-ubyte"))
    y = _read_idx(_find_idx(folder, "train-labels-idx1-ubyte"))
    xt = _read_idx(_find_idx(folder, "t10k-images-idx3-ubyte"))
    yt = _read_idx(_find_idx(folder, "t10k-labels-idx1-ubyte"))
    train, val = _carve_val(x, y)
    return {"train": train, "val": val, "test": _digit_split(xt, yt, f"{folder} t10k")}


# ---------------------------------------------------------------------------------------------
# text works
# ---------------------------------------------------------------------------------------------
def load_text_works(cfg: TextConfig, cache: Path, seed: int) -> dict[str, dict[str, str]]:
    """Whole works split into train / val / test: ``{split: {work_name: text}}``."""
    if cfg.local_dir is not None:
        files = sorted(Path(cfg.local_dir).glob("*.txt"))
        works = {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}
        where = str(cfg.local_dir)
    else:
        archive = fetch_archive(cfg.archive, cache)
        members = read_members(archive, cfg.archive.member)
        works = {Path(k).stem: v.decode("utf-8", errors="replace") for k, v in members.items()}
        where = str(archive)
    works = {k: _normalise_text(v) for k, v in works.items() if v.strip()}
    n_held = cfg.n_val_works + cfg.n_test_works
    if len(works) <= n_held:
        raise DataError(f"{where}: {len(works)} text works found, need more than {n_held} (val + test)")
    names = sorted(works)
    order = np.random.default_rng(seed).permutation(len(names))
    picked = [names[i] for i in order]
    val = picked[: cfg.n_val_works]
    test = picked[cfg.n_val_works : n_held]
    split_of = {n: "val" for n in val} | {n: "test" for n in test}
    out: dict[str, dict[str, str]] = {s: {} for s in SPLITS}
    for name in names:
        out[split_of.get(name, "train")][name] = works[name]
    return out


def _normalise_text(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip() + "\n"


# ---------------------------------------------------------------------------------------------
# a user's own image-caption folder
# ---------------------------------------------------------------------------------------------
MAX_FOLDER_PIXELS = 8192 * 8192  # per image of a caption folder, checked from the header


def _inside(folder: Path, file, where: str) -> Path:
    """``folder/file`` if ``file`` is a relative path that stays inside ``folder``."""
    if not isinstance(file, str) or not file:
        raise DataError(f'{where}: "file" must be a path string, got {file!r}')
    path = (folder / file).resolve()
    if Path(file).is_absolute() or not path.is_relative_to(folder.resolve()):
        raise DataError(f"{where}: {file!r} is outside {folder} (files are paths relative to the folder)")
    return path


def load_caption_folder(folder: Path, canvas: int) -> tuple[np.ndarray, list[dict]]:
    """Images listed in ``folder/captions.jsonl`` ({"file": ..., "caption": ...} per line; paths
    relative to the folder and inside it), centre-cropped and resized to ``canvas`` x ``canvas``
    RGB uint8. Sizes are checked from the headers before any image is decoded."""
    from PIL import Image

    from transfusion.errors import UserError
    from transfusion.images import open_rgb

    index = folder / "captions.jsonl"
    if not index.is_file():
        raise DataError(f'{folder}: expected captions.jsonl with one {{"file", "caption"}} object per line')
    images, records = [], []
    for lineno, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file, caption = row["file"], str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{index}:{lineno}: expected {{"file": ..., "caption": ...}}') from None
        path = _inside(folder, file, f"{index}:{lineno}")
        try:
            im = open_rgb(path, MAX_FOLDER_PIXELS)
        except UserError as err:
            raise DataError(f"{index}:{lineno}: {err}") from None
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((canvas, canvas), Image.BICUBIC)
        images.append(np.asarray(im, dtype=np.uint8))
        records.append({"caption": caption, "content": None, "source": file})
    if len(images) < 3:
        raise DataError(f"{index}: need at least 3 images (train, val and test), got {len(images)}")
    return np.stack(images), records
