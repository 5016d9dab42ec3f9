"""``transfusion plan``: a run's size before it runs -- parameters, FLOPs, memory per GPU, time.

The model is built on the meta device from the params (no memory, no weights). Memory per GPU is
what the training loop (``transfusion.train.loop``) holds: fp32 weights (autocast keeps fp32
masters), the EMA's copy, fp32 gradients (views into DDP's all-reduce buckets: no second copy),
AdamW's two moments (1/N of them per worker with ``train.shard_optimizer``, ZeRO-1), the bf16
weight copies autocast saves for backward, and the tensors one
micro-step saves for backward (activations). Per decoder layer and token, LLaMA / Qwen2 layers
save (bytes; D hidden, Dkv key/value width, I MLP width, H heads; read off the saved tensors on
CPU, :func:`measure_step`)::

                        bf16 autocast            fp32
    RMSNorms (fp32)     16 D                     16 D        input and normalised, two norms
    linear inputs       5 x 2 D (one cast each)  2 x 4 D     q/k/v and gate/up share one in fp32
    q, k, v, output     2 (2 D + 2 Dkv)          4 (2 D + 2 Dkv)
    MLP                 4 x 2 I                  4 x 4 I     gate, silu(gate), up, product
    logsumexp           4 H                      4 H

and per row, the (L, L) mask sdpa expands for every layer (none with flex). Then the final norm,
the rotary tables, the LM head (its input and the fp32 log-softmax over the vocabulary at every
text target), and the image encoder/decoder, run on one real image on CPU and scaled by the
images. FLOPs: 2 per multiply-add of every linear at every token of the packed rows, attention
over whole rows (4 L^2 D per layer and row, dense: flex skips masked blocks), the LM head at the
text targets, the image modules counted by torch's FlopCounterMode; backward = 2 x forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from transfusion.layout import SpecialIds

GB = 1e9  # vendors state GPU memory in decimal GB (the H200's 141 GB)
USABLE = 0.9  # the rest: the CUDA context, NCCL buffers, allocator fragmentation
CAPTION_TOKENS = 12  # assumed caption length (the scenes' captions are 4-14 BPE tokens)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense peak
    fp32_tflops: float


GPUS = {
    "h200": Gpu("H200", 141, 989, 67),
    "h100": Gpu("H100 80GB", 80, 989, 67),
    "a100-80gb": Gpu("A100 80GB", 80, 312, 19.5),
    "a100-40gb": Gpu("A100 40GB", 40, 312, 19.5),  # AWS p4d.24xlarge
}


@dataclass(frozen=True)
class StepShape:
    """One worker's micro-step: ``rows`` packed rows of ``length`` tokens, ``images`` images,
    ``targets`` tokens with a text target."""

    rows: int
    length: int
    images: int
    targets: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @classmethod
    def of_batch(cls, batch) -> StepShape:
        B, L = batch.valid.shape
        return cls(B, L, len(batch.images), int((batch.labels != -100).sum()))


@dataclass(frozen=True)
class Dims:
    """The backbone's shape, read from its Hugging Face config."""

    hidden: int
    head_dim: int  # the config's own, else hidden / heads
    kv: int  # key/value width: kv heads x head dim
    mlp: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            config.hidden_size,
            head_dim,
            config.num_key_value_heads * head_dim,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.vocab_size,
        )


# ---------------------------------------------------------------------------------------------
# the model on the meta device
# ---------------------------------------------------------------------------------------------
def vocabulary(cfg) -> tuple[int, SpecialIds]:
    """The vocabulary size and special ids: the tokenizer stage's output when it exists, else
    ``tokenizer.vocab_size`` (the ids then only name slots of the config)."""
    from transfusion.data.tokenizer import load_tokenizer

    if (cfg.paths.tokenizer / "tokenizer.json").is_file():
        tok = load_tokenizer(cfg.paths.tokenizer)
        return len(tok), SpecialIds.from_tokenizer(tok)
    V = cfg.tokenizer.vocab_size
    return V, SpecialIds(bos=0, eos=1, pad=2, boi=V - 2, eoi=V - 1)


def latent_shape(cfg) -> tuple[int, int, int]:
    """(C, H, W) of one latent: the pretrained VAE's channels, or ``vae.latent_channels``."""
    import json

    channels = cfg.vae.latent_channels
    if cfg.vae.pretrained is not None:
        channels = json.loads((cfg.vae.pretrained / "config.json").read_text())["latent_channels"]
    return channels, cfg.latents.size, cfg.latents.size


def model_config(cfg):
    """The TransfusionConfig training would build from the params (a pretrained backbone's
    config.json is read; no weights)."""
    from transformers import AutoConfig

    from transfusion.model import backbone as bb
    from transfusion.model.transfusion import config_from_params

    m = cfg.model
    vocab, special = vocabulary(cfg)
    if m.pretrained is not None:
        backbone = AutoConfig.from_pretrained(str(m.pretrained), local_files_only=True)
        backbone.vocab_size = vocab  # resized for <boi> / <eoi>, as from_params does
    else:
        positions = max(2048, m.max_length)
        backbone = bb.preset_config(
            m.backbone, m.size, vocab, positions, bb.attn_implementation(m.attention), special.__dict__
        )
    return config_from_params(m, cfg.diffusion, cfg.sampling, backbone.to_dict(), special, latent_shape(cfg))


def meta_model(config):
    """The model of ``config`` on the meta device: shapes only."""
    from transfusion.model import TransfusionModel

    with torch.device("meta"):
        return TransfusionModel(config)


def count_params(model) -> dict[str, int]:
    """Total, trainable, and embedding (the vocabulary-sized token table and LM head) parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bb = model.backbone
    embedding = bb.get_input_embeddings().weight.numel() + bb.lm_head.weight.numel()
    return {"total": total, "trainable": trainable, "embedding": embedding}


def cast_params(model) -> int:
    """Parameters autocast copies to bf16 (every matrix and conv kernel but the token table)."""
    table = model.backbone.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not table)


# ---------------------------------------------------------------------------------------------
# the step's shape, activations, FLOPs
# ---------------------------------------------------------------------------------------------
def expected_shape(cfg, image_tokens: int) -> StepShape:
    """A worker's micro-step from the params: ``train.batch_size`` examples in the mixture's
    shares, packed into rows of ``model.max_length`` (captions of CAPTION_TOKENS tokens)."""
    mix = cfg.mixture
    text = mix.text / (mix.text + mix.caption_to_image + mix.image_to_caption)
    n = cfg.train.batch_size
    mean_length = text * (mix.text_length + 2) + (1 - text) * (CAPTION_TOKENS + image_tokens + 2)
    targets = text * (mix.text_length + 1) + (1 - text) * (CAPTION_TOKENS + 3)
    rows = math.ceil(n * mean_length / cfg.model.max_length)
    length = min(cfg.model.max_length, math.ceil(n * mean_length))  # rows are padded to the longest
    return StepShape(rows, length, round(n * (1 - text)), round(n * targets))


def activation_bytes(dims: Dims, shape: StepShape, bf16: bool, flex: bool, per_image: int) -> dict[str, int]:
    """The tensors one training micro-step saves for backward, by part (module docstring)."""
    s = 2 if bf16 else 4
    D = dims.hidden
    inputs = 5 * 2 * D if bf16 else 2 * 4 * D
    per_token = 16 * D + inputs + s * (2 * D + 2 * dims.kv) + 4 * s * dims.mlp + 4 * dims.heads
    mask = 0 if flex else s * shape.length**2 * shape.rows
    return {
        "layers": dims.layers * (per_token * shape.tokens + mask),
        "final norm, rotary": (8 * D + 8 * dims.head_dim) * shape.tokens,
        "LM head": shape.targets * (s * D + 4 * dims.vocab),
        "images": per_image * shape.images,
    }


def attention_flops(dims: Dims, shape: StepShape) -> int:
    """Forward FLOPs of attention over whole rows (QK^T and AV), dense."""
    return dims.layers * 4 * shape.length**2 * dims.heads * dims.head_dim * shape.rows


def forward_flops(dims: Dims, shape: StepShape, per_image: int) -> int:
    """Forward FLOPs of one micro-step (module docstring)."""
    D, q_width = dims.hidden, dims.heads * dims.head_dim
    per_token = 2 * dims.layers * (2 * D * q_width + 2 * D * dims.kv + 3 * D * dims.mlp)
    head = 2 * D * dims.vocab * shape.targets
    return per_token * shape.tokens + attention_flops(dims, shape) + head + per_image * shape.images


def image_path(config, bf16: bool) -> tuple[int, int]:
    """(saved bytes, forward FLOPs) of the image encoder and decoder for one image, measured on
    CPU on a copy of the model with no decoder layers and a tiny vocabulary."""
    from torch.utils.flop_counter import FlopCounterMode

    from transfusion.model import TransfusionModel

    small = {"num_hidden_layers": 0, "vocab_size": 8, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    shell = config.model_copy(update={"backbone": config.backbone | small})
    shell = TransfusionModel(shell.model_copy(update={"special": dict.fromkeys(config.special, 0)})).train()
    C, S = config.latent_channels, config.latent_size
    x, t = torch.randn(1, C, S, S), torch.tensor([500.0])

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens, temb, skips = shell.embed_images(x, t)
            return shell.predict_images(tokens, temb, skips)

    with FlopCounterMode(display=False) as flops:
        saved = saved_tensor_bytes(run, shell)[0]
    return saved, flops.get_total_flops()


def batch_estimate(config, model, batch, bf16: bool) -> tuple[dict[str, int], int, int]:
    """The activations by part, the forward FLOPs and attention's share of them, of one training
    micro-step of ``model`` (built from ``config``) on a real ``batch``."""
    shape, dims = StepShape.of_batch(batch), Dims.of(model.backbone.config)
    image_saved, image_flops = image_path(config, bf16)
    acts = activation_bytes(dims, shape, bf16, config.attention == "flex", image_saved)
    return acts, forward_flops(dims, shape, image_flops), attention_flops(dims, shape)


def saved_tensor_bytes(run, model) -> tuple[int, object]:
    """(bytes of the distinct tensors ``run()`` saves for backward that are not ``model``'s
    parameters, ``run()``'s result): activation memory by tensor-size accounting."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    dims: Dims
    params: dict[str, int]
    shape: StepShape
    micro_steps: int  # per optimizer step (train.grad_accum)
    workers: int
    bf16: bool
    device: str
    capacity_gb: float
    memory: dict[str, int]  # bytes per GPU (or per CPU process), by part
    activations: dict[str, int]
    flops_per_step: int  # per worker per optimizer step
    peak_tflops: float | None
    mfu: float

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= USABLE * self.capacity_gb * GB

    @property
    def step_seconds(self) -> float | None:
        return None if self.peak_tflops is None else self.flops_per_step / (self.peak_tflops * 1e12 * self.mfu)

    def to_dict(self) -> dict:
        return asdict(self) | {"total_bytes": self.total_bytes, "fits": self.fits, "step_seconds": self.step_seconds}


def precision_is_bf16(cfg) -> bool:
    """``train.precision`` as the loop resolves it: auto is bf16 on a GPU, and on this CPU when
    it has native bf16."""
    from transfusion.train.loop import resolve_precision

    if cfg.train.precision == "auto" and cfg.train.use_gpu:
        return True
    return resolve_precision(cfg.train.precision, torch.device("cpu"))


def state_bytes(model, bf16: bool, ema: bool = False, optimizer_shards: int = 1) -> dict[str, int]:
    """Weights, EMA, gradients, AdamW (its 1/N share under ZeRO-1) and bf16 weight copies, in
    bytes. DDP's all-reduce buckets add nothing: the gradients are views into them."""
    counts = count_params(model)
    return {
        "weights (fp32)": 4 * counts["total"],
        "EMA copy": 4 * counts["total"] if ema else 0,
        "gradients (fp32)": 4 * counts["trainable"],
        "AdamW moments": 8 * counts["trainable"] // optimizer_shards,
        "bf16 weight copies": 2 * cast_params(model) if bf16 else 0,
    }


def device_of(cfg, gpu: Gpu, bf16: bool) -> tuple[str, float, float | None]:
    """(name, memory in GB, peak TFLOPS or None) of what one worker trains on."""
    if cfg.train.use_gpu:
        return gpu.name, gpu.memory_gb, gpu.bf16_tflops if bf16 else gpu.fp32_tflops
    import psutil

    return "CPU (this machine's memory)", psutil.virtual_memory().total / GB, None


def make_plan(cfg, gpu: Gpu, mfu: float) -> Plan:
    """The plan of the params ``cfg`` on ``gpu`` at model FLOPs utilisation ``mfu``."""
    config = model_config(cfg)
    model = meta_model(config)
    dims, bf16 = Dims.of(model.backbone.config), precision_is_bf16(cfg)
    shape = expected_shape(cfg, config.image_tokens)
    image_saved, image_flops = image_path(config, bf16)
    acts = activation_bytes(dims, shape, bf16, config.attention == "flex", image_saved)
    tc = cfg.train
    shards = tc.num_workers if tc.shard_optimizer else 1
    memory = state_bytes(model, bf16, tc.ema_decay > 0, shards) | {"activations": sum(acts.values())}
    device, capacity, peak = device_of(cfg, gpu, bf16)
    m = cfg.model
    name = f"{m.backbone} {m.size}" if m.pretrained is None else str(m.pretrained)
    flops = 3 * forward_flops(dims, shape, image_flops) * cfg.train.grad_accum
    return Plan(
        name,
        dims,
        count_params(model),
        shape,
        cfg.train.grad_accum,
        cfg.train.num_workers,
        bf16,
        device,
        capacity,
        memory,
        acts,
        flops,
        peak,
        mfu,
    )


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _seconds(t: float) -> str:
    return f"{t:,.2f} s" if t >= 1 else f"{1e3 * t:,.1f} ms"


def _flops(n: float) -> str:
    return f"{n / 1e12:,.2f} TFLOP" if n >= 1e12 else f"{n / 1e9:,.2f} GFLOP"


def _count(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def format_plan(plan: Plan, cfg) -> str:
    """The plan as the lines ``transfusion plan`` prints."""
    d, s, p = plan.dims, plan.shape, plan.params
    precision = "bf16 autocast" if plan.bf16 else "fp32"
    lines = [
        f"model        {plan.model}: D {d.hidden}, MLP {d.mlp}, {d.layers} layers, {d.heads} heads "
        f"(kv width {d.kv}), vocabulary {d.vocab:,} (built on the meta device)",
        f"parameters   total {_count(p['total'])}, trainable {_count(p['trainable'])}, "
        f"embedding {_count(p['embedding'])} (token table + LM head)",
        f"micro-step   per worker: {cfg.train.batch_size} examples -> {s.rows} rows x {s.length} tokens, "
        f"{s.images} images, {s.targets:,} text targets (captions of {CAPTION_TOKENS} tokens assumed)",
        f"FLOPs        {_flops(plan.flops_per_step)} per optimizer step per worker "
        f"({plan.micro_steps} micro-step(s); x{plan.workers} workers)",
        f"memory       per {'GPU' if cfg.train.use_gpu else 'process'}, {precision}, {plan.workers} worker(s):",
    ]
    for part, n in plan.memory.items():
        lines.append(f"  {part:<22} {_gb(n):>12}")
    detail = ", ".join(f"{k} {_gb(v)}" for k, v in plan.activations.items())
    lines[-1] += f"   ({detail})"
    lines.append(f"  {'total':<22} {_gb(plan.total_bytes):>12}")
    usable = USABLE * plan.capacity_gb * GB
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"device       {plan.device} {plan.capacity_gb:,.0f} GB: {verdict} "
        f"({_gb(plan.total_bytes)} of {_gb(usable)} usable, {100 * USABLE:.0f}%)"
    )
    if plan.step_seconds is not None:
        lines.append(
            f"time/step    {_seconds(plan.step_seconds)} at {100 * plan.mfu:.0f}% MFU "
            f"({plan.peak_tflops:g} TFLOPS {'bf16' if plan.bf16 else 'fp32'} peak)"
        )
    else:
        lines.append("time/step    not estimated on CPU (benchmarks/train_step.py measures it)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the estimate checked against a real CPU step
# ---------------------------------------------------------------------------------------------
MEASURABLE = 2e8  # parameters: beyond this a CPU check takes too long and too much memory


def synthetic_batch(config, cfg, seed: int = 0):
    """``train.batch_size`` examples in the mixture's shares (random ids and latents, captions of
    CAPTION_TOKENS tokens), packed by the training collator."""
    from transfusion.data.collate import Collator, caption_to_image, image_to_caption, text_example

    mix, n = cfg.mixture, cfg.train.batch_size
    weights = torch.tensor([mix.text, mix.caption_to_image, mix.image_to_caption])
    g = torch.Generator().manual_seed(seed)
    kinds = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    V, shape = config.backbone["vocab_size"], (config.latent_channels, config.latent_size, config.latent_size)

    def ids(k: int) -> list[int]:
        return torch.randint(3, V - 3, (k,), generator=g).tolist()

    def example(kind: int):
        if kind == 0:
            return text_example(ids(mix.text_length))
        z = torch.randn(shape, generator=g)
        return caption_to_image(ids(CAPTION_TOKENS), z) if kind == 1 else image_to_caption(z, ids(CAPTION_TOKENS))

    special = SpecialIds(**config.special)
    collate = Collator(special, config.patches_per_image, cfg.model.max_length, config.time_conditioning == "token")
    return collate([example(k) for k in kinds])


def measure_step(model, batch, bf16: bool) -> tuple[int, int]:
    """(bytes saved for backward beyond the parameters, FLOPs of forward + backward) of one real
    training micro-step of ``model`` on ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.loss(batch, torch.Generator().manual_seed(0), loss_weight=5.0, noise_limit=0.5).total

    with FlopCounterMode(display=False) as flops:
        saved, loss = saved_tensor_bytes(forward, model)
        loss.backward()
    return saved, flops.get_total_flops()


def check_against_cpu(cfg, plan: Plan) -> dict[str, tuple[float, float]]:
    """Estimate and measurement of one real CPU micro-step (sdpa) at the shape the collator packs:
    parameter bytes, saved-for-backward bytes (activations and bf16 weight copies), FLOPs."""
    from transfusion.errors import BadInput
    from transfusion.model import TransfusionModel

    if plan.params["total"] > MEASURABLE:
        raise BadInput(
            f"plan --measure: {_count(plan.params['total'])} parameters is too large to run on this CPU "
            f"(at most {_count(int(MEASURABLE))}); the estimate stands alone"
        )
    config = model_config(cfg).model_copy(update={"attention": "sdpa"})
    torch.manual_seed(0)
    model = TransfusionModel(config).train()
    batch = synthetic_batch(config, cfg)
    acts, forward, attention = batch_estimate(config, model, batch, plan.bf16)
    estimate = sum(acts.values()) + state_bytes(model, plan.bf16)["bf16 weight copies"]
    saved, flops = measure_step(model, batch, plan.bf16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "parameter bytes": (4 * plan.params["total"], weights),
        "saved for backward (bytes)": (estimate, saved),
        # torch's FlopCounterMode has no formula for the CPU flash-attention kernel: compared without it
        "FLOPs outside attention (fwd + bwd)": (3 * (forward - attention), flops),
    }
