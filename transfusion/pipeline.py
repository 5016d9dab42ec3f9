"""The exported model as one object: text in, text and pixels out (as diffusers' pipelines).

``TransfusionPipeline.from_pretrained(folder)`` loads what the training stage exports (model,
tokenizer, VAE, latent scaling); ``from_uri`` also takes an MLflow model URI
(``runs:/<run id>/model``). Its methods wrap the model's: prompts and captions as strings,
images as uint8 arrays (N, H, W, 3); sampled latents are unscaled and decoded by the VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class TransfusionPipeline:
    def __init__(self, model, tokenizer, vae, scaling_factor: float) -> None:
        self.model, self.tokenizer, self.vae, self.scaling_factor = model.eval(), tokenizer, vae.eval(), scaling_factor

    @classmethod
    def from_pretrained(cls, folder: Path, attention: str | None = None) -> "TransfusionPipeline":
        from transfusion.data.tokenizer import load_tokenizer
        from transfusion.model import TransfusionModel
        from transfusion.vae import load_vae

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no model folder here")
        meta_file = folder / "latents.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder}: not an exported model (no latents.json; export it with `transfusion train`)")
        meta = json.loads(meta_file.read_text())
        model = TransfusionModel.from_pretrained(folder, attention=attention)
        return cls(model, load_tokenizer(folder), load_vae(folder / meta.get("vae", "vae")), float(meta["scaling_factor"]))

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None) -> "TransfusionPipeline":
        """A local folder, or an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<v>``)."""
        if "://" in uri or uri.startswith(("runs:/", "models:/")):
            from transfusion.tracking import download_artifacts

            return cls.from_pretrained(download_artifacts(uri, tracking_uri))
        return cls.from_pretrained(Path(uri))

    # -- helpers -------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.model.config.latent_size * (2 ** (len(self.vae.config.block_out_channels) - 1))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        from transfusion.vae import decode

        return decode(self.vae, latents.float().cpu() / self.scaling_factor)

    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        from transfusion.vae import encode

        images = np.asarray(images)
        want = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, {want[0]}, {want[1]}, 3), got {images.dtype} {images.shape}")
        device = next(self.model.parameters()).device
        return (encode(self.vae, images) * self.scaling_factor).to(device)

    # -- the four modes ------------------------------------------------------------------------
    def generate_text(self, prompts: list[str], **kwargs) -> list[str]:
        return [self._text(ids) for ids in self.model.generate_text([self._ids(p) for p in prompts], **kwargs)]

    def sample_images(self, captions: list[str], **kwargs) -> np.ndarray:
        return self.decode_latents(self.model.sample_images([self._ids(c) for c in captions], **kwargs))

    def caption(self, images: np.ndarray, **kwargs) -> list[str]:
        return [self._text(ids) for ids in self.model.caption(self.encode_images(images), **kwargs)]

    def generate(self, prompt: str, **kwargs) -> list[str | np.ndarray]:
        out: list[str | np.ndarray] = []
        for part in self.model.generate(self._ids(prompt), **kwargs):
            out.append(self.decode_latents(part[None])[0] if torch.is_tensor(part) else self._text(part))
        return out


def read_images(files: list[Path], size: int) -> np.ndarray:
    """PNG/JPEG files -> uint8 (N, size, size, 3); a bad or wrongly sized file is a ValueError."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                rgb = im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"{f}: no such image file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{f}: cannot read image ({err})") from None
        if rgb.size != (size, size):
            raise ValueError(f"{f}: expected a {size}x{size} image, got {rgb.size[0]}x{rgb.size[1]}")
        out.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(out)


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    from transfusion.io import atomic_file

    im = Image.fromarray(image)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_file(Path(path), "wb") as fh:
        im.save(fh, format="PNG")
