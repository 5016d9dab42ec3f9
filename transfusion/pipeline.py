"""The exported model as one object: text in, text and pixels out (as diffusers' pipelines).

``save_pretrained(folder)`` writes exactly what ``from_pretrained(folder)`` reads::

    config.json, model.safetensors   the TransfusionModel (its saved config and weights)
    tokenizer files                  the tokenizer, special tokens included
    vae/                             the AutoencoderKL (diffusers' save_pretrained)
    pipeline.json                    latent scaling factor and shape, the VAE folder, the MLflow
                                     run that trained the model
    manifest.json                    size and sha256 of every file above (written last);
                                     ``from_pretrained`` checks it before loading anything

``from_uri`` also takes an MLflow model URI (``runs:/<run id>/model``). The pipeline is the one
inference surface (as in diffusers): prompts and captions as strings, images as uint8 arrays
(N, H, W, 3); it owns its scheduler (the model's default sampler; another one is built for a
call that asks for it) and runs ``transfusion.sampling`` on the model, in eval mode for the call
(a model being trained is put back in training mode after it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from transfusion import sampling
from transfusion.diffusion import build_scheduler
from transfusion.errors import BadInput, MissingInput

PIPELINE_FILE, VAE_FOLDER = "pipeline.json", "vae"


class TransfusionPipeline:
    def __init__(self, model, tokenizer, vae, scaling_factor: float, run_id: str | None = None, scheduler=None) -> None:
        self.model, self.tokenizer, self.vae, self.scaling_factor = model, tokenizer, vae.eval(), scaling_factor
        conf = model.config
        self.scheduler = scheduler if scheduler is not None else build_scheduler(conf.diffusion, conf.sampling.sampler)
        self.run_id = run_id  # the MLflow run that trained the model, when known

    def with_model(self, model) -> TransfusionPipeline:
        """The same tokenizer, VAE and scheduler around other weights of the same model (the EMA)."""
        return TransfusionPipeline(model, self.tokenizer, self.vae, self.scaling_factor, self.run_id, self.scheduler)

    def save_pretrained(self, folder: Path) -> None:
        """The pipeline's folder, written atomically (it appears whole or not at all)."""
        from transfusion.io import atomic_dir, write_manifest

        conf = self.model.config
        with atomic_dir(Path(folder)) as tmp:
            self.model.write_files(tmp, self.tokenizer)
            self.vae.save_pretrained(str(tmp / VAE_FOLDER), safe_serialization=True)
            meta = {
                "scaling_factor": self.scaling_factor,
                "latent_shape": [conf.latent_channels, conf.latent_size, conf.latent_size],
                "vae": VAE_FOLDER,
                "run_id": self.run_id,
            }
            (tmp / PIPELINE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            write_manifest(tmp)

    @classmethod
    def from_pretrained(cls, folder: Path, verify: bool = True) -> TransfusionPipeline:
        """The exported pipeline in ``folder``; with ``verify`` (the default) every file is first
        checked against ``manifest.json``, and the first one that differs is named."""
        from transfusion.data.tokenizer import load_tokenizer
        from transfusion.io import verify_manifest
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
        if verify:
            verify_manifest(folder, BadInput, "no readable manifest.json (re-export it; verify=False skips the check)")
        try:
            meta = json.loads(meta_file.read_text())
            vae_folder, scaling_factor, run_id = meta["vae"], float(meta["scaling_factor"]), meta.get("run_id")
        except (ValueError, KeyError, TypeError) as err:
            raise BadInput(f"{meta_file}: expected JSON with vae and scaling_factor ({err})") from None
        model = TransfusionModel.from_pretrained(folder)
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

    @contextmanager
    def _eval(self) -> Iterator[None]:
        """The model in eval mode for one call, its mode restored after it."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _sampling(self, steps, cfg_scale, sampler, cfg_interval) -> dict:
        """The sampling arguments of one call: what is given, else the model's saved ``sampling``."""
        own = self.model.config.sampling
        sampler = sampler or own.sampler
        return {
            "scheduler": self.scheduler
            if sampler == own.sampler
            else build_scheduler(self.model.config.diffusion, sampler),
            "steps": steps or own.steps,
            "cfg_scale": own.cfg_scale if cfg_scale is None else cfg_scale,
            "cfg_interval": tuple(cfg_interval or own.cfg_interval),
        }

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

    def _check_fits(self, captions: list[str], ids: list[list[int]]) -> None:
        limit = int(self.model.config.backbone.get("max_position_embeddings", 2048))
        image = self.model.config.image_tokens
        for caption, row in zip(captions, ids):
            if 1 + len(row) + image > limit:
                raise BadInput(
                    f"caption of {len(caption)} characters is {len(row)} tokens; with the image "
                    f"({image} tokens) it exceeds the model's {limit} positions"
                )

    # -- the four modes ------------------------------------------------------------------------
    def generate_text(self, prompts: list[str], **kwargs) -> list[str]:
        """Continue each prompt; options of :func:`transfusion.sampling.generate_text`."""
        with self._eval():
            out = sampling.generate_text(self.model, [self._ids(p) for p in prompts], **kwargs)
        return [self._text(ids) for ids in out]

    def sample_images(
        self,
        captions: list[str],
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str | None = None,
        cfg_interval: tuple[float, float] | None = None,
        seed: int = 0,
        use_cache: bool = True,
        progress=None,
    ) -> np.ndarray:
        """One image per caption (N, H, W, 3); image i is drawn from ``seed + i``. Sampling
        settings not given are the model's (its saved ``diffusion`` section)."""
        ids = [self._ids(c) for c in captions]
        self._check_fits(captions, ids)
        how = self._sampling(steps, cfg_scale, sampler, cfg_interval)
        with self._eval():
            latents = sampling.sample_latents(self.model, ids, seed=seed, use_cache=use_cache, progress=progress, **how)
        return self.decode_latents(latents)

    def caption(self, images: np.ndarray, max_new_tokens: int = 24) -> list[str]:
        """Greedy captions of uint8 images (N, H, W, 3)."""
        return self.caption_latents(self.encode_images(images), max_new_tokens)

    def caption_latents(self, latents: torch.Tensor, max_new_tokens: int = 24) -> list[str]:
        """Greedy captions of clean scaled latents (N, C, h, w) (the probes' val latents)."""
        device = next(self.model.parameters()).device
        with self._eval():
            out = sampling.caption_latents(self.model, latents.to(device), max_new_tokens)
        return [self._text(ids) for ids in out]

    def sample_grid(self, captions: list[str], path: Path, sampling=None, seed: int = 0) -> np.ndarray:
        """One image per caption (``sampling``: a ``SamplingConfig``, None: the model's), drawn as
        a captioned PNG grid at ``path``; returns the images."""
        from transfusion.images import render_grid

        images = self.sample_images(list(captions), seed=seed, **sampling_kwargs(sampling))
        render_grid(images, list(captions), Path(path), cols=min(6, len(images)))
        return images

    def generate(
        self,
        prompt: str,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str | None = None,
        cfg_interval: tuple[float, float] | None = None,
        **kwargs,
    ) -> list[str | np.ndarray]:
        """Interleaved text and images (the paper's inference); options of
        :func:`transfusion.sampling.generate_interleaved`, sampling defaults the model's."""
        how = self._sampling(steps, cfg_scale, sampler, cfg_interval)
        with self._eval():
            parts = sampling.generate_interleaved(self.model, self._ids(prompt), **how, **kwargs)
        return [self.decode_latents(part[None])[0] if torch.is_tensor(part) else self._text(part) for part in parts]


def sampling_kwargs(sampling) -> dict:
    """A ``SamplingConfig`` as the keyword arguments of :meth:`TransfusionPipeline.sample_images`
    (None: none, the model's own)."""
    if sampling is None:
        return {}
    return {
        "steps": sampling.steps,
        "cfg_scale": sampling.cfg_scale,
        "sampler": sampling.sampler,
        "cfg_interval": tuple(sampling.cfg_interval),
    }
