"""The exported model as one object: text in, text and pixels out (as diffusers' pipelines).

``save_pretrained(folder)`` writes exactly what ``from_pretrained(folder)`` reads::

    config.json, model.safetensors   the TransfusionModel (its saved config and weights)
    tokenizer files                  the tokenizer, special tokens included
    vae/                             the AutoencoderKL (diffusers' save_pretrained)
    pipeline.json                    latent scaling factor and shape, the VAE folder, the MLflow
                                     run that trained the model

``from_uri`` also takes an MLflow model URI (``runs:/<run id>/model``). The methods wrap the
model's: prompts and captions as strings, images as uint8 arrays (N, H, W, 3); sampled latents
are unscaled and decoded by the VAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from transfusion.errors import BadInput, MissingInput

PIPELINE_FILE, VAE_FOLDER = "pipeline.json", "vae"


class TransfusionPipeline:
    def __init__(self, model, tokenizer, vae, scaling_factor: float, run_id: str | None = None) -> None:
        self.model, self.tokenizer, self.vae, self.scaling_factor = model.eval(), tokenizer, vae.eval(), scaling_factor
        self.run_id = run_id  # the MLflow run that trained the model, when known

    def save_pretrained(self, folder: Path) -> None:
        """The pipeline's folder, written atomically (it appears whole or not at all)."""
        from transfusion.io import atomic_dir

        cfg = self.model.config
        with atomic_dir(Path(folder)) as tmp:
            self.model.write_files(tmp, self.tokenizer)
            self.vae.save_pretrained(str(tmp / VAE_FOLDER), safe_serialization=True)
            meta = {
                "scaling_factor": self.scaling_factor,
                "latent_shape": [cfg.latent_channels, cfg.latent_size, cfg.latent_size],
                "vae": VAE_FOLDER,
                "run_id": self.run_id,
            }
            (tmp / PIPELINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: Path, attention: str | None = None) -> TransfusionPipeline:
        from transfusion.data.tokenizer import load_tokenizer
        from transfusion.model import TransfusionModel
        from transfusion.vae import load_vae

        folder = Path(folder)
        if not folder.is_dir():
            raise MissingInput(f"{folder}: no model folder here")
        meta_file = folder / PIPELINE_FILE
        if not meta_file.is_file():
            raise MissingInput(
                f"{folder}: not an exported model (no {PIPELINE_FILE}; export it with `transfusion train`)"
            )
        try:
            meta = json.loads(meta_file.read_text())
            vae_folder, scaling_factor, run_id = meta["vae"], float(meta["scaling_factor"]), meta.get("run_id")
        except (ValueError, KeyError, TypeError) as err:
            raise BadInput(f"{meta_file}: expected JSON with vae and scaling_factor ({err})") from None
        model = TransfusionModel.from_pretrained(folder, attention=attention)
        return cls(model, load_tokenizer(folder), load_vae(folder / vae_folder), scaling_factor, run_id)

    @classmethod
    def from_parts(
        cls, model, tokenizer_dir: Path, vae_dir: Path, latents_dir: Path, run_id: str | None = None
    ) -> TransfusionPipeline:
        """A trained model with the pipeline's tokenizer, VAE and latent scaling (training outputs)."""
        from transfusion.data.latents import load_meta
        from transfusion.data.tokenizer import load_tokenizer
        from transfusion.vae import load_vae

        scaling_factor = float(load_meta(latents_dir)["scaling_factor"])
        return cls(model, load_tokenizer(tokenizer_dir), load_vae(vae_dir), scaling_factor, run_id)

    @classmethod
    def from_uri(cls, uri: str, tracking_uri: str | None = None) -> TransfusionPipeline:
        """A local folder, or an MLflow URI (``runs:/<id>/model``, ``models:/<name>/<v>``) read
        through ``tracking_uri``."""
        if "://" in uri or uri.startswith(("runs:/", "models:/")):
            from transfusion.tracking import download_artifacts

            if tracking_uri is None:
                raise BadInput(f"{uri}: an MLflow model URI needs the tracking URI to read it from")
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
            raise BadInput(f"images must be uint8 (N, {want[0]}, {want[1]}, 3), got {images.dtype} {images.shape}")
        device = next(self.model.parameters()).device
        return (encode(self.vae, images) * self.scaling_factor).to(device)

    # -- the four modes ------------------------------------------------------------------------
    def generate_text(self, prompts: list[str], **kwargs) -> list[str]:
        return [self._text(ids) for ids in self.model.generate_text([self._ids(p) for p in prompts], **kwargs)]

    def sample_images(self, captions: list[str], **kwargs) -> np.ndarray:
        ids = [self._ids(c) for c in captions]
        limit = int(self.model.config.backbone.get("max_position_embeddings", 2048))
        image = self.model.config.patches_per_image + 3  # <boi> [time] patches <eoi>
        for caption, row in zip(captions, ids):
            if 1 + len(row) + image > limit:
                raise BadInput(
                    f"caption of {len(caption)} characters is {len(row)} tokens; with the image "
                    f"({image} tokens) it exceeds the model's {limit} positions"
                )
        return self.decode_latents(self.model.sample_images(ids, **kwargs))

    def caption(self, images: np.ndarray, **kwargs) -> list[str]:
        return [self._text(ids) for ids in self.model.caption(self.encode_images(images), **kwargs)]

    def sample_grid(
        self, captions: list[str], path: Path, steps: int | None = None, cfg_scale: float | None = None, seed: int = 0
    ) -> np.ndarray:
        """One image per caption, drawn as a captioned PNG grid at ``path``; returns the images."""
        from transfusion.data.scenes import render_grid

        images = self.sample_images(list(captions), steps=steps, cfg_scale=cfg_scale, seed=seed)
        render_grid(images, list(captions), Path(path), cols=min(6, len(images)))
        return images

    def generate(self, prompt: str, **kwargs) -> list[str | np.ndarray]:
        out: list[str | np.ndarray] = []
        for part in self.model.generate(self._ids(prompt), **kwargs):
            out.append(self.decode_latents(part[None])[0] if torch.is_tensor(part) else self._text(part))
        return out


MAX_SCALE = 16  # `generate` writes images enlarged 4x; `caption` takes up to 16x back


def read_images(files: list[Path], size: int) -> np.ndarray:
    """PNG/JPEG files -> uint8 (N, size, size, 3). A square image of an integer multiple of
    ``size`` (up to 16x: what ``generate`` and ``interleave`` write, enlarged) is scaled back
    down; any other size, a bad file, or a header claiming more pixels is a one-line error,
    checked before the image is decoded."""
    from PIL import Image

    from transfusion.io import open_rgb

    def size_ok(w: int, h: int, f: Path) -> None:
        if w != h or w % size or not 1 <= w // size <= MAX_SCALE:
            raise BadInput(
                f"{f}: expected a {size}x{size} image (or a square multiple up to {MAX_SCALE}x), got {w}x{h}"
            )

    out = []
    for f in files:
        rgb = open_rgb(f, (size * MAX_SCALE) ** 2, lambda w, h, f=f: size_ok(w, h, f))
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BOX)  # the exact inverse of a NEAREST enlargement
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
