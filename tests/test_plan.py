"""`transfusion plan`: the model built on the meta device has the built model's parameter counts;
its memory estimate is within 20% of tensor-size accounting on a real CPU step (tiny and base,
bf16 and fp32); the memory parts follow the training loop's settings; the 7B shape is LLaMA-2-7B's."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from conftest import REPO
from transfusion import plan as P
from transfusion.config import load_params
from transfusion.data.tokenizer import train_bpe

PRESETS = {"tiny": [], "base": ["pipelines/cpu-quality.yaml"]}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok = train_bpe(["a red 4 and a blue 3 to the left of a 7", "to be or not to be"] * 50, vocab_size=300)
    tok.save_pretrained(str(folder))
    return folder


def params(*overlays: str, tokenizer=None, **sets: object):
    overrides = [f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]
    if tokenizer is not None:
        overrides.append(f"paths.tokenizer={tokenizer}")
    return load_params([REPO / "params.yaml", *(REPO / o for o in overlays)], overrides)


@pytest.mark.parametrize("size", ["tiny", "base"])
@pytest.mark.parametrize("freeze_text", [False, True])
def test_plan_counts_equal_the_built_models(size, freeze_text, tokenizer_dir):
    from transfusion.data.tokenizer import load_tokenizer
    from transfusion.model import TransfusionModel

    cfg = params(*PRESETS[size], tokenizer=tokenizer_dir, model__freeze_text=freeze_text)
    meta = P.meta_model(P.model_config(cfg))
    assert all(p.is_meta for p in meta.parameters())  # nothing allocated
    tok = load_tokenizer(tokenizer_dir)
    built = TransfusionModel.from_params(cfg.model, cfg.diffusion, cfg.sampling, tok, P.latent_shape(cfg))
    assert P.count_params(meta) == P.count_params(built)
    assert P.count_params(built)["total"] == sum(p.numel() for p in built.parameters())
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert P.count_params(meta)["trainable"] == trainable < (P.count_params(meta)["total"] if freeze_text else 1e12)


@pytest.mark.parametrize("size,precision", [("tiny", "bf16"), ("tiny", "fp32"), ("base", "bf16"), ("base", "fp32")])
def test_memory_estimate_within_20_percent_of_a_real_cpu_step(size, precision, tokenizer_dir):
    cfg = params(*PRESETS[size], tokenizer=tokenizer_dir, train__precision=precision)
    plan = P.make_plan(cfg, P.GPUS["h200"], 0.4)
    checked = P.check_against_cpu(cfg, plan)
    estimate, measured = checked["parameter bytes"]
    assert estimate == measured
    estimate, measured = checked["saved for backward (bytes)"]
    assert 0.8 <= estimate / measured <= 1.2, (estimate, measured)
    estimate, measured = checked["FLOPs outside attention (fwd + bwd)"]
    assert estimate == pytest.approx(measured, rel=0.02)


def test_the_estimate_follows_precision_and_attention(tokenizer_dir):
    """bf16 halves the layers' activations but for the fp32 norms; flex drops the dense mask."""
    cfg = params(tokenizer=tokenizer_dir)
    dims = P.Dims.of(P.meta_model(P.model_config(cfg)).backbone.config)
    shape = P.StepShape(rows=4, length=256, images=10, targets=100)
    fp32 = P.activation_bytes(dims, shape, bf16=False, flex=False, per_image=0)["layers"]
    bf16 = P.activation_bytes(dims, shape, bf16=True, flex=False, per_image=0)["layers"]
    flex = P.activation_bytes(dims, shape, bf16=True, flex=True, per_image=0)["layers"]
    assert 0.5 * fp32 < bf16 < 0.8 * fp32
    assert bf16 - flex == dims.layers * 2 * 256**2 * 4


def test_memory_parts_follow_the_training_settings(tokenizer_dir):
    one = P.make_plan(params(tokenizer=tokenizer_dir), P.GPUS["h200"], 0.4).memory
    assert one["EMA copy"] == one["weights (fp32)"] > 0 and one["AdamW moments"] == 2 * one["weights (fp32)"]
    many = P.make_plan(params(tokenizer=tokenizer_dir, train__num_workers=4), P.GPUS["h200"], 0.4).memory
    assert many == one  # DDP: a full replica per worker (gradients are views into its buckets)
    zero = P.make_plan(
        params(tokenizer=tokenizer_dir, train__num_workers=4, train__shard_optimizer=True), P.GPUS["h200"], 0.4
    ).memory
    assert zero["AdamW moments"] == one["AdamW moments"] // 4 and zero["gradients (fp32)"] == one["gradients (fp32)"]
    no_ema = P.make_plan(params(tokenizer=tokenizer_dir, train__ema_decay=0.0), P.GPUS["h200"], 0.4).memory
    assert no_ema["EMA copy"] == 0
    frozen = P.make_plan(params(tokenizer=tokenizer_dir, model__freeze_text=True), P.GPUS["h200"], 0.4)
    assert frozen.memory["AdamW moments"] == 8 * frozen.params["trainable"] < 8 * frozen.params["total"]
    fp32 = P.make_plan(params(tokenizer=tokenizer_dir, train__precision="fp32"), P.GPUS["h200"], 0.4).memory
    assert fp32["bf16 weight copies"] == 0


def test_the_7b_preset_plans_llama2_7b_and_fits_an_h200_only_with_zero1(tmp_path):
    # no tokenizer stage output: the vocabulary is tokenizer.vocab_size (LLaMA-2's 32000 here)
    cfg = params("pipelines/cluster-7b.yaml", tokenizer=tmp_path / "none", tokenizer__vocab_size=32000)
    model = P.meta_model(P.model_config(cfg))
    assert sum(p.numel() for p in model.backbone.parameters()) == 6_738_415_616  # LLaMA-2-7B
    plan = P.make_plan(cfg, P.GPUS["h200"], 0.4)
    assert plan.device == "H200" and plan.bf16 and plan.workers == 16 and cfg.train.shard_optimizer
    n = plan.params["total"]
    # fp32 weights, EMA, gradients (12 B) + AdamW's 8 B over 16 workers + bf16 copies (~2 B) + activations
    assert 14 * n < plan.total_bytes < 15 * n + 10e9
    assert plan.fits and not P.make_plan(cfg, P.GPUS["a100-40gb"], 0.4).fits
    ddp = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shard_optimizer": False})})
    assert not P.make_plan(ddp, P.GPUS["h200"], 0.4).fits  # plain DDP: 20 B per parameter and more
    assert plan.step_seconds == pytest.approx(plan.flops_per_step / (989e12 * 0.4))


def test_plan_cli_prints_writes_json_and_refuses_bad_input(tmp_path, tokenizer_dir):
    out = tmp_path / "plan.json"
    argv = ["plan", "-p", str(REPO / "params.yaml"), "-S", f"paths.tokenizer={tokenizer_dir}", "--json", str(out)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "parameters   total" in result.output and "fits" in result.output
    saved = json.loads(out.read_text())
    assert (
        saved["params"]["total"]
        == P.count_params(P.meta_model(P.model_config(params(tokenizer=tokenizer_dir))))["total"]
    )
    bad = CliRunner().invoke(app, ["plan", "--gpu", "v100"])
    assert bad.exit_code == 2 and "--gpu: expected one of h200" in bad.output
    big = CliRunner().invoke(
        app, ["plan", "-p", str(REPO / "params.yaml"), "-p", str(REPO / "pipelines/cluster-7b.yaml"), "--measure"]
    )
    assert big.exit_code == 1 and "too large to run on this CPU" in big.output
    assert torch.get_default_device().type == "cpu"  # the meta build left the default device alone
