"""TransfusionModel: one causal-LM transformer over text tokens and noised latent patches.

    input_ids ─ token embeddings ───────────────┐
    x_t (N,C,H,W) ─ patch encoder (+ time emb) ─┴─> (B,L,D) ─ backbone (hybrid mask) ─┬─ LM head ─> logits
                                                                                        └─ patch decoder ─> eps / v

The constructor's argument is the saved config (``config.json``); ``save_pretrained`` writes it
with safetensors weights and the tokenizer, ``from_pretrained`` rebuilds the same model. The
diffusion maths live in ``transfusion.diffusion`` (``self.objective``); ``loss`` wires the two
together. Inference (text, images, captions, interleaved) is ``transfusion.pipeline``'s.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn

from transfusion.config import DiffusionConfig, SamplingConfig, ScheduleConfig, sampler_misfit
from transfusion.diffusion import build_objective
from transfusion.errors import BadInput, MissingInput
from transfusion.layout import PATCH, TIME, Batch, SpecialIds
from transfusion.model import backbone as bb
from transfusion.model.mask import dense_to_block_mask, hybrid_block_mask, hybrid_mask
from transfusion.model.patching import build_patching
from transfusion.model.positions import PatchPositions

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class TransfusionConfig(BaseModel):
    """Everything needed to rebuild the model (saved as config.json)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # config.json: no inf, no NaN

    backbone: dict  # the Hugging Face config of the causal LM (model_type llama | qwen2)
    latent_channels: int
    latent_size: int
    patch_size: int
    patch_encoder: str = "linear"
    unet_channels: list[int] = [64]
    unet_skips: bool = True  # False: the U-Net decoder sees only the transformer's outputs
    time_conditioning: str = "add"
    patch_positions: str = "none"  # models saved before the option have none
    image_attention: str = "bidirectional"  # causal: the paper's Table 5 ablation
    attention: str = "sdpa"
    freeze_text: bool = False
    special: dict[str, int]  # bos, eos, pad, boi, eoi
    diffusion: ScheduleConfig  # the diffusion process
    sampling: SamplingConfig  # how the pipeline samples by default (the ``sampling`` section)

    @model_validator(mode="before")
    @classmethod
    def _sampling_from_older_configs(cls, data):
        """Models saved before the ``sampling`` section kept its keys in ``diffusion``."""
        if isinstance(data, dict) and "sampling" not in data and isinstance(data.get("diffusion"), dict):
            diffusion = dict(data["diffusion"])
            sampling = {"sampler": diffusion.pop("sampler", None), "steps": diffusion.pop("sample_steps", None)}
            sampling |= {"cfg_scale": diffusion.pop("cfg_scale", None)}
            sampling["cfg_interval"] = diffusion.pop("cfg_interval", (0.0, 1.0))  # before it: guided everywhere
            data = data | {"diffusion": diffusion, "sampling": sampling}
        return data

    @model_validator(mode="after")
    def _sampler_fits(self) -> TransfusionConfig:
        misfit = sampler_misfit(self.diffusion.objective, self.sampling.sampler)
        if misfit:
            raise ValueError(f"sampling: {misfit}")
        return self

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        """Tokens one image occupies in a sequence: <boi> [time token] patches <eoi>."""
        return self.patches_per_image + 2 + int(self.time_conditioning == "token")


@dataclass
class LossOutput:
    total: torch.Tensor
    lm: torch.Tensor
    diffusion: torch.Tensor
    timesteps: torch.Tensor  # (N,) the drawn training timesteps (for inspection)


class TransfusionModel(nn.Module):
    def __init__(self, config: TransfusionConfig, backbone: nn.Module | None = None) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else bb.from_config_dict(config.backbone, config.attention)
        D = self.backbone.config.hidden_size
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, D)
        self.patch_in, self.patch_out = build_patching(
            config.patch_encoder,
            config.latent_channels,
            config.latent_size,
            config.patch_size,
            D,
            config.unet_channels,
            config.unet_skips,
        )
        self.patch_pos = PatchPositions(config.patch_positions, D, config.latent_size // config.patch_size)
        self.objective = build_objective(config.diffusion)  # the training objective over the saved schedule
        if config.freeze_text:
            self.backbone.requires_grad_(False)

    @property
    def special(self) -> SpecialIds:
        return SpecialIds(**self.config.special)

    # ------------------------------------------------------------------------------------------
    # the network
    # ------------------------------------------------------------------------------------------
    @property
    def bidirectional_images(self) -> bool:
        return self.config.image_attention == "bidirectional"

    def attention_mask(self, batch: Batch):
        # causal images (an ablation): no image block is bidirectional
        blocks = batch.image_block if self.bidirectional_images else torch.full_like(batch.image_block, -1)
        if self.config.attention == "flex":
            return hybrid_block_mask(batch.document, blocks, batch.valid)
        return hybrid_mask(batch.document, blocks, batch.valid)  # (B, 1, L, L)

    def embed_images(self, x_t: torch.Tensor, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Noisy latents (N, C, H, W) at model times (N,) -> patch vectors (N, P, D), the time
        embedding (N, D) and the encoder's skips (U-Net)."""
        temb = self.time_embed(self.time_proj(time.to(x_t.device)).to(x_t.dtype))  # (N, D)
        tokens, skips = self.patch_in(x_t, temb, add_time=self.config.time_conditioning == "add")
        table = self.patch_pos()  # (1, P, D) or None: which cell each patch is
        if table is not None:
            tokens = tokens + table.to(tokens.dtype)
        return tokens, temb, skips

    def image_block(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The image's token vectors in sequence order: [time token] + patches  (N, P', D)."""
        if self.config.time_conditioning == "token":
            return torch.cat([temb[:, None, :].to(tokens.dtype), tokens], dim=1)
        return tokens

    def predict_images(self, patch_hidden: torch.Tensor, temb: torch.Tensor, skips: list) -> torch.Tensor:
        """Transformer outputs at the patches (N, P, D) -> the diffusion prediction (N, C, H, W)."""
        return self.patch_out(patch_hidden, temb, skips)

    def forward(
        self, batch: Batch, x_t: torch.Tensor, time: torch.Tensor, mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, L, D) and the image prediction (N, C, H, W) for noisy latents
        ``x_t`` at (model) times ``time`` (N,)."""
        has_images = x_t.numel() > 0
        h = self.embed_tokens(batch.input_ids)  # (B, L, D)
        is_patch, is_time = batch.modality == PATCH, batch.modality == TIME
        if has_images:
            # 1. time embedding and patch vectors per image  (N, D), (N, P, D)
            tokens, temb, skips = self.embed_images(x_t, time)
            # 2. token embeddings with the image slots filled in  (B, L, D)
            h = h.clone()
            h[is_patch] = tokens[batch.image_block[is_patch], batch.patch_index[is_patch]].to(h.dtype)
            if is_time.any():
                h[is_time] = temb[batch.image_block[is_time]].to(h.dtype)
        # 3. the transformer over the hybrid mask  (B, L, D)
        mask = self.attention_mask(batch) if mask is None else mask
        hidden = self.transformer(h, mask, batch.position_ids)
        if not has_images:
            return hidden, x_t
        # 4. image outputs back in latent shape  (N, C, H, W)
        per_image = hidden.new_zeros(tokens.shape[0], tokens.shape[1], hidden.shape[-1])
        per_image[batch.image_block[is_patch], batch.patch_index[is_patch]] = hidden[is_patch]
        return hidden, self.predict_images(per_image, temb, skips)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.lm_head(hidden)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> embeddings (B, L, D)."""
        return self.backbone.get_input_embeddings()(ids)

    def transformer(self, embeds: torch.Tensor, mask, positions: torch.Tensor | None, cache=None) -> torch.Tensor:
        """The backbone's layers over (B, q, D) ``embeds`` -> hidden states (B, q, D). ``mask``:
        bool (B, 1, q, K + q) for sdpa, a BlockMask, or None (plain causal); ``positions``: (B, q)
        or None (0, 1, ...); ``cache``: a KV cache to extend. With ``attention: flex`` a bool
        mask becomes a BlockMask here (the cached sampler's masks are dense)."""
        static = contextlib.nullcontext()
        if self.config.attention == "flex":
            mask = dense_to_block_mask(mask) if isinstance(mask, torch.Tensor) else mask
            if embeds.device.type == "cpu":  # torch's CPU flex kernel fails to compile for dynamic shapes
                static = torch._dynamo.config.patch(automatic_dynamic_shapes=False)
        with static:
            out = self.backbone.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=cache is not None,
            )
        return out.last_hidden_state

    def new_cache(self):
        """An empty KV cache for :meth:`transformer` (a transformers ``DynamicCache``)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.backbone.config)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def loss(
        self, batch: Batch, generator: torch.Generator | None = None, *, loss_weight: float, noise_limit: float
    ) -> LossOutput:
        """LM cross-entropy on text targets + ``loss_weight`` (lambda) * diffusion MSE on every
        image; an image before its caption draws noise levels <= ``noise_limit`` only."""
        # 1. one timestep and noise per image; images before their caption get capped noise
        t = self.objective.sample_timesteps(batch.image_first.cpu(), noise_limit, generator)
        x0 = batch.images
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        hidden = None

        def predict(x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            nonlocal hidden
            hidden, pred = self(batch, x_t, time)  # 2. one pass of the transformer
            return pred

        # 3. the diffusion loss (the objective's) and the LM loss where there is a text target
        if len(x0):
            diff = self.objective.training_losses(predict, x0, noise, t)
        else:
            predict(x0, self.objective.model_time(t))
            diff = hidden.sum() * 0.0
        targets = batch.labels != -100
        if targets.any():
            logits = self.text_logits(hidden[targets]).float()
            lm = F.cross_entropy(logits, batch.labels[targets])
        else:
            lm = hidden.sum() * 0.0
        total = lm + loss_weight * diff
        return LossOutput(total, lm.detach(), diff.detach(), t)

    # ------------------------------------------------------------------------------------------
    # building, saving, loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_params(
        cls, model_cfg, diffusion_cfg: DiffusionConfig, sampling: SamplingConfig, tokenizer, latent_shape
    ) -> TransfusionModel:
        """A new model from the ``model`` / ``diffusion`` / ``sampling`` params sections and the
        tokenizer."""
        special = SpecialIds.from_tokenizer(tokenizer)
        if model_cfg.pretrained is not None:
            backbone = bb.load_pretrained_backbone(Path(model_cfg.pretrained), len(tokenizer), model_cfg.attention)
            backbone.config.pad_token_id = special.pad
        else:
            backbone = bb.build_backbone(
                model_cfg.backbone,
                model_cfg.size,
                len(tokenizer),
                max(2048, model_cfg.max_length),
                model_cfg.attention,
                special.__dict__,
            )
        config = config_from_params(
            model_cfg, diffusion_cfg, sampling, backbone.config.to_dict(), special, latent_shape
        )
        return cls(config, backbone)

    def save_pretrained(self, directory: Path, tokenizer=None) -> None:
        """config.json + model.safetensors (+ the tokenizer), written atomically."""
        from transfusion.io import atomic_dir

        with atomic_dir(Path(directory)) as tmp:
            self.write_files(tmp, tokenizer)

    def write_files(self, folder: Path, tokenizer=None) -> None:
        """The files of :meth:`save_pretrained` into an existing folder (not atomic)."""
        from safetensors.torch import save_model

        folder = Path(folder)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        save_model(self, str(folder / WEIGHTS_NAME))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))

    @classmethod
    def from_pretrained(cls, directory: Path) -> TransfusionModel:
        from safetensors.torch import load_model

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise MissingInput(f"{directory}: not a saved Transfusion model (no {name})")
        try:
            config = TransfusionConfig.model_validate(json.loads((directory / CONFIG_NAME).read_text()))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(map(str, first["loc"])) or "(top level)"
            got = repr(first.get("input"))[:60]
            raise BadInput(f"{directory / CONFIG_NAME}: {field}: {first['msg']} (got {got})") from None
        except ValueError as err:  # not JSON
            raise BadInput(f"{directory / CONFIG_NAME}: invalid model config ({str(err).splitlines()[0]})") from None
        model = cls(config)
        try:
            load_model(model, str(directory / WEIGHTS_NAME), strict=True)
        except Exception as err:
            raise BadInput(f"{directory / WEIGHTS_NAME}: cannot load weights ({str(err).splitlines()[0]})") from None
        return model.eval()


def config_from_params(
    model_cfg,
    diffusion_cfg: DiffusionConfig,
    sampling: SamplingConfig,
    backbone: dict,
    special: SpecialIds,
    latent_shape,
) -> TransfusionConfig:
    """The saved config of a model built from the params sections, around ``backbone`` (the
    Hugging Face config as a dict) for latents of ``latent_shape`` (C, H, W)."""
    channels, size, _ = latent_shape
    return TransfusionConfig(
        backbone=backbone,
        latent_channels=channels,
        latent_size=size,
        patch_size=model_cfg.patch_size,
        patch_encoder=model_cfg.patch_encoder,
        unet_channels=model_cfg.unet_channels,
        unet_skips=model_cfg.unet_skips,
        time_conditioning=model_cfg.time_conditioning,
        patch_positions=model_cfg.patch_positions,
        image_attention=model_cfg.image_attention,
        attention=model_cfg.attention,
        freeze_text=model_cfg.freeze_text,
        special=dict(special.__dict__),
        diffusion=diffusion_cfg.schedule,
        sampling=sampling,
    )
