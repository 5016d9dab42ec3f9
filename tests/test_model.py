"""TransfusionModel: attention properties through outputs, overfitting, save/load, pretrained
backbones, noise limit and caption dropout."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import LATENT, build_tiny_model, diffusion_config, sampling_config, section
from conftest import MODEL_CORPUS as CORPUS
from transfusion.data.collate import Collator, caption_to_image, image_to_caption, text_example
from transfusion.data.tokenizer import build_tokenizer
from transfusion.errors import BadInput
from transfusion.layout import PATCH
from transfusion.model import TransfusionModel
from transfusion.model.mask import hybrid_mask

RECIPE = {"loss_weight": 5.0, "noise_limit": 0.5}  # the paper's lambda and image-first noise cap


@pytest.fixture(scope="module")
def tokenizer(text_tokenizer):
    return text_tokenizer


def make_model(tokenizer, seed=0, diffusion=None, sampling=None, **model_kw) -> TransfusionModel:
    return build_tiny_model(tokenizer, seed, diffusion, sampling, **model_kw)


def collator(model: TransfusionModel, **kw) -> Collator:
    return Collator(
        model.special, model.config.patches_per_image, 256, time_token=model.config.time_conditioning == "token", **kw
    )


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run(model, batch, x_t, t):
    with torch.no_grad():
        return model(batch, x_t, t)


VARIANTS = list(itertools.product(["llama", "qwen2"], ["linear", "unet"]))


# ---------------------------------------------------------------------------------------------
# the attention rules, observed through the model's outputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backbone", "patch_encoder"), VARIANTS)
def test_later_text_never_changes_earlier_outputs(tokenizer, backbone, patch_encoder):
    model = make_model(tokenizer, backbone=backbone, patch_encoder=patch_encoder)
    col = collator(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *LATENT, generator=gen)
    t = torch.tensor([300.0])
    tail = ids(tokenizer, "to be or not")
    a = col([_with_tail(tokenizer, x[0], tail)])
    b = col([_with_tail(tokenizer, x[0], tail[:-1] + [(tail[-1] + 1) % 250 + 5])])
    changed = int((a.input_ids != b.input_ids).nonzero()[0, 1])
    ha, pa = run(model, a, x, t)
    hb, pb = run(model, b, x, t)
    torch.testing.assert_close(ha[:, :changed], hb[:, :changed], rtol=0, atol=1e-5)
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5)  # the image came before the change
    assert pa.abs().max() > 1e-3
    assert not torch.allclose(ha[:, changed], hb[:, changed])


def _with_tail(tokenizer, latent, tail):
    from transfusion.data.collate import Example

    return Example([ids(tokenizer, "a red 4"), latent, tail])


@pytest.mark.parametrize(("backbone", "patch_encoder"), VARIANTS)
def test_a_patch_is_seen_by_its_image_but_not_by_earlier_tokens(tokenizer, backbone, patch_encoder):
    model = make_model(tokenizer, backbone=backbone, patch_encoder=patch_encoder)
    batch = collator(model)([caption_to_image(ids(tokenizer, "a red 4 and"), torch.zeros(LATENT))])
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, :, 6:8, 6:8] += 3.0  # the last patch (raster order) of the only image
    t = torch.tensor([500.0])
    hx, _ = run(model, batch, x, t)
    hy, _ = run(model, batch, y, t)
    patches = (batch.modality[0] == PATCH).nonzero().flatten()
    first_patch = int(patches[0])
    torch.testing.assert_close(hx[:, :first_patch], hy[:, :first_patch], rtol=0, atol=1e-6)  # caption, <boi>
    moved = (hx[0, patches[:-1]] - hy[0, patches[:-1]]).abs().amax(dim=-1)
    assert bool((moved > 1e-4).all()), "every other patch of the image must see the changed patch"
    eoi = int(patches[-1]) + 1
    assert (hx[0, eoi] - hy[0, eoi]).abs().max() > 1e-4  # text after the image sees it


@pytest.mark.parametrize(("backbone", "patch_encoder"), VARIANTS)
def test_first_image_ignores_the_second(tokenizer, backbone, patch_encoder):
    from transfusion.data.collate import Example

    model = make_model(tokenizer, backbone=backbone, patch_encoder=patch_encoder)
    ex = Example([ids(tokenizer, "a 3"), torch.zeros(LATENT), ids(tokenizer, "and then"), torch.zeros(LATENT)])
    batch = collator(model)([ex])
    assert batch.images.shape[0] == 2
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *LATENT, generator=g)
    y = x.clone()
    y[1] = torch.randn(*LATENT, generator=g)
    t = torch.tensor([100.0, 700.0])
    hx, px = run(model, batch, x, t)
    hy, py = run(model, batch, y, t)
    first = batch.image_block[0] == 0
    torch.testing.assert_close(hx[0, first], hy[0, first], rtol=0, atol=1e-6)
    torch.testing.assert_close(px[0], py[0], rtol=0, atol=1e-6)
    assert (px[1] - py[1]).abs().max() > 1e-4


def test_mask_matches_the_documented_layout(tokenizer):
    model = make_model(tokenizer)
    batch = collator(model)(
        [caption_to_image([11, 12], torch.zeros(LATENT)), image_to_caption(torch.zeros(LATENT), [13])]
    )
    m = hybrid_mask(batch.document, batch.image_block, batch.valid)[0, 0]
    P = model.config.patches_per_image
    first = slice(4, 4 + P)
    assert m[first, first].all()  # bidirectional inside the image
    assert not m[3, 4]  # <boi> does not see its patches
    assert m[4 + P, first].all()  # <eoi> sees them all
    second_doc = 4 + P + 2
    assert not m[second_doc:, :second_doc].any()  # packed examples are isolated
    assert m.tril()[:second_doc, :second_doc].diagonal().all()


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("objective", "patch_encoder"), list(itertools.product(["ddpm", "flow"], ["linear", "unet"])))
def test_tiny_model_overfits_one_batch(tokenizer, objective, patch_encoder):
    model = make_model(tokenizer, patch_encoder=patch_encoder, diffusion=diffusion_config(objective)).train()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, *LATENT, generator=g)
    batch = collator(model)(
        [
            caption_to_image(ids(tokenizer, "a red 4"), latents[0]),
            image_to_caption(latents[1], ids(tokenizer, "a blue 3")),
            caption_to_image(ids(tokenizer, "a 7"), latents[2]),
            text_example(ids(tokenizer, "to be or not to be that is the question")),
        ]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        out = model.loss(batch, generator=torch.Generator().manual_seed(0), **RECIPE)  # the same noise each step
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_loss_weight_scales_only_the_image_gradients(tokenizer):
    """lambda multiplies the diffusion loss alone: at lambda 5 and 2 (the same noise), the
    gradient of the patch decoder (reached only by the diffusion loss) scales by 5/2 and the LM
    head's (reached only by the LM loss) does not move; a text-only batch leaves the decoder
    without gradient."""

    def grads(batch, weight):
        model.zero_grad()
        model.loss(batch, torch.Generator().manual_seed(3), loss_weight=weight, noise_limit=0.5).total.backward()
        decoder = torch.cat([p.grad.flatten() for p in model.patch_out.parameters() if p.grad is not None])
        return decoder, model.backbone.lm_head.weight.grad.clone()

    model = make_model(tokenizer).train()
    batch = collator(model)([caption_to_image(ids(tokenizer, "a red 4"), torch.randn(LATENT))])
    dec5, head5 = grads(batch, 5.0)
    dec2, head2 = grads(batch, 2.0)
    assert dec5.abs().max() > 0 and head5.abs().max() > 0
    torch.testing.assert_close(dec5, 2.5 * dec2, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(head5, head2, rtol=1e-5, atol=1e-8)
    text_only = collator(model)([text_example(ids(tokenizer, "to be or not"))])
    model.zero_grad()
    model.loss(text_only, **RECIPE).total.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.patch_out.parameters())


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_noise_limit_for_images_before_their_caption(tokenizer, objective):
    model = make_model(tokenizer, diffusion=diffusion_config(objective))
    latents = torch.randn(LATENT)
    examples = [image_to_caption(latents, ids(tokenizer, "a 3"))] * 20 + [
        caption_to_image(ids(tokenizer, "a 3"), latents)
    ] * 20
    batch = collator(model)(examples)
    assert batch.image_first.tolist() == [True] * 20 + [False] * 20
    drawn = torch.cat(
        [
            model.loss(batch, torch.Generator().manual_seed(s), loss_weight=5.0, noise_limit=0.5).timesteps
            for s in range(10)
        ]
    ).view(10, 40)
    times = model.objective.model_time(drawn.flatten()).view(10, 40)  # 0..1000 scale for both
    assert times[:, :20].max() <= 500
    assert times[:, 20:].max() > 700  # uncapped images reach high noise


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_dropped_captions_train_the_whole_noise_range(tokenizer, objective):
    """CFG's unconditional branch (<bos> <boi> ...) starts sampling at pure noise, so images whose
    caption was dropped must reach t > noise_limit; images before their caption never do."""
    model = make_model(tokenizer, diffusion=diffusion_config(objective))
    latents, cap = torch.randn(LATENT), ids(tokenizer, "a 3")
    examples = [caption_to_image(cap, latents)] * 20 + [image_to_caption(latents, cap)] * 20
    batch = collator(model, caption_dropout=1.0)(examples)
    assert batch.caption_dropped.tolist() == [True] * 20 + [False] * 20
    assert batch.image_first.tolist() == [False] * 20 + [True] * 20
    drawn = torch.cat(
        [
            model.loss(batch, torch.Generator().manual_seed(s), loss_weight=5.0, noise_limit=0.5).timesteps
            for s in range(10)
        ]
    ).view(10, 40)
    times = model.objective.model_time(drawn.flatten()).view(10, 40)
    assert times[:, :20].max() > 700  # unconditional images see high noise
    assert times[:, 20:].max() <= 500  # image-first images stay capped


def test_caption_dropout_is_observable(tokenizer):
    model = make_model(tokenizer)
    cap = ids(tokenizer, "a red 4")
    always = collator(model, caption_dropout=1.0)([caption_to_image(cap, torch.zeros(LATENT))])
    assert always.caption_dropped.tolist() == [True]
    assert not set(cap) & set(always.input_ids[0].tolist())  # caption tokens gone
    assert always.input_ids[0, :2].tolist() == [model.special.bos, model.special.boi]
    never = collator(model, caption_dropout=0.0)([caption_to_image(cap, torch.zeros(LATENT))])
    assert never.input_ids[0, 1 : 1 + len(cap)].tolist() == cap
    some = collator(model, caption_dropout=0.1, seed=0)([caption_to_image(cap, torch.zeros(LATENT))] * 2000)
    assert 0.08 < some.caption_dropped.float().mean().item() < 0.12
    kept = collator(model, caption_dropout=1.0)([image_to_caption(torch.zeros(LATENT), cap)])
    assert kept.caption_dropped.tolist() == [False]  # only captions before their image drop


# ---------------------------------------------------------------------------------------------
# saving and pretrained backbones
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("patch_encoder", "time_conditioning", "patch_positions"),
    [("linear", "token", "none"), ("unet", "add", "none"), ("linear", "add", "learned")],
)
def test_save_load_identical_outputs(tokenizer, tmp_path, patch_encoder, time_conditioning, patch_positions):
    model = make_model(
        tokenizer, patch_encoder=patch_encoder, time_conditioning=time_conditioning, patch_positions=patch_positions
    )
    model.save_pretrained(tmp_path / "m", tokenizer)
    loaded = TransfusionModel.from_pretrained(tmp_path / "m")
    batch = collator(model)([caption_to_image(ids(tokenizer, "a red 4"), torch.zeros(LATENT))])
    x, t = torch.randn(1, *LATENT), torch.tensor([250.0])
    h1, p1 = run(model, batch, x, t)
    h2, p2 = run(loaded, batch, x, t)
    assert torch.equal(h1, h2) and torch.equal(p1, p2)
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.suffix in (".json", ".safetensors"))[:2] == [
        "config.json",
        "model.safetensors",
    ]
    from transfusion.data.tokenizer import load_tokenizer

    assert load_tokenizer(tmp_path / "m")("a red 4")["input_ids"] == tokenizer("a red 4")["input_ids"]


def test_learned_patch_positions_tell_identical_patches_apart(tokenizer):
    """A latent whose patches are all equal gives equal patch vectors with RoPE positions only;
    learned positions make each patch index its own vector (the cell it is), and only by the
    saved table: the difference between two patches is the difference of their rows."""
    x, t = torch.ones(1, *LATENT), torch.tensor([300.0])
    with torch.no_grad():
        plain, _, _ = make_model(tokenizer).embed_images(x, t)  # (1, P, D)
        learned_model = make_model(tokenizer, patch_positions="learned")
        learned, _, _ = learned_model.embed_images(x, t)
    torch.testing.assert_close(plain[0], plain[0, :1].expand_as(plain[0]), rtol=0, atol=1e-6)
    pos = learned_model.patch_pos()[0]  # (P, D)
    assert pos.shape == (learned_model.config.patches_per_image, learned.shape[-1])
    torch.testing.assert_close(learned[0] - learned[0, :1], pos - pos[:1], rtol=0, atol=1e-5)
    assert (learned[0, 1:] - learned[0, :1]).abs().amax(-1).min() > 1e-3


def test_2d_position_tables_factor_into_a_row_part_and_a_column_part():
    """sincos_2d is DiT's table (diffusers' function): patches in one column share its first
    half, patches in one row its second half; learned_2d starts equal to it, and stays a sum of
    a row vector and a column vector (each patch is exactly row + column)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from transfusion.model.positions import PatchPositions

    D, side = 16, 3
    fixed = PatchPositions("sincos_2d", D, side)()[0].view(side, side, D)  # (row, col, D)
    want = torch.as_tensor(get_2d_sincos_pos_embed(D, side, base_size=side, output_type="pt")).float()
    torch.testing.assert_close(fixed.reshape(-1, D), want)
    torch.testing.assert_close(fixed[1, :, : D // 2], fixed[0, :, : D // 2])  # same column: same first half
    torch.testing.assert_close(fixed[:, 1, D // 2 :], fixed[:, 0, D // 2 :])  # same row: same second half
    assert (fixed[0, 0] - fixed[0, 1]).abs().max() > 0.1 and (fixed[0, 0] - fixed[1, 0]).abs().max() > 0.1
    learned = PatchPositions("learned_2d", D, side)
    torch.testing.assert_close(learned()[0], want)
    with torch.no_grad():
        learned.rows.add_(torch.randn(side, D))
        learned.cols.add_(torch.randn(side, D))
    table = learned()[0].view(side, side, D)
    torch.testing.assert_close(table[2, 1] - table[0, 1], table[2, 0] - table[0, 0])  # row moves add the same
    assert sum(p.numel() for p in learned.parameters()) == 2 * side * D
    assert not list(PatchPositions("sincos_2d", D, side).parameters())  # fixed: not trained, not saved


@pytest.mark.parametrize("image_attention", ["bidirectional", "causal"])
def test_image_attention_sets_whether_a_patch_sees_later_patches(tokenizer, image_attention):
    """Bidirectional (Transfusion): the first patch's output changes when the last patch's input
    does. Causal (the Table 5 ablation): it cannot, while the last patch still sees the first."""
    model = make_model(tokenizer, image_attention=image_attention)
    batch = collator(model)([caption_to_image(ids(tokenizer, "a red 4"), torch.zeros(LATENT))])
    x, t = torch.randn(1, *LATENT), torch.tensor([250.0])
    changed = x.clone()
    changed[..., -model.config.patch_size :, -model.config.patch_size :] += 3.0  # the last patch only
    h1, _ = run(model, batch, x, t)
    h2, _ = run(model, batch, changed, t)
    patches = (batch.modality[0] == PATCH).nonzero()[:, 0]
    first_moves = not torch.allclose(h1[0, patches[0]], h2[0, patches[0]], atol=1e-6)
    assert first_moves == (image_attention == "bidirectional")
    changed_first = x.clone()
    changed_first[..., : model.config.patch_size, : model.config.patch_size] += 3.0
    h3, _ = run(model, batch, changed_first, t)
    assert not torch.allclose(h1[0, patches[-1]], h3[0, patches[-1]], atol=1e-6)


def test_unet_patch_vectors_are_normalised_before_the_transformer(tokenizer):
    """The U-Net's patch vectors come through GroupNorm + SiLU: their size does not follow the
    size of its ResNet features (unnormalised, they reached norms ~140 in a trained model)."""
    model = make_model(tokenizer, patch_encoder="unet", patch_size=4, unet_channels=[16, 16])
    x, t = torch.randn(2, *LATENT), torch.tensor([300.0, 300.0])
    with torch.no_grad():
        small, _ = model.patch_in(x, model.time_embed(model.time_proj(t)), add_time=False)
        big, _ = model.patch_in(100 * x, model.time_embed(model.time_proj(t)), add_time=False)
    ratio = big.norm(dim=-1).mean() / small.norm(dim=-1).mean()
    assert 0.5 < ratio < 2.0, ratio


@pytest.mark.parametrize("skips", [True, False])
def test_unet_without_skips_cannot_route_the_image_around_the_transformer(tokenizer, skips):
    """With the transformer's outputs held fixed, the U-Net decoder's prediction still follows
    the noisy input through the skips; without them it cannot (it sees the outputs and time)."""
    model = make_model(tokenizer, patch_encoder="unet", patch_size=4, unet_channels=[16, 16], unet_skips=skips)
    torch.nn.init.normal_(model.patch_out.conv_out.weight, std=0.1)  # zero-initialised: make it say something
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        temb = model.time_embed(model.time_proj(t))
        fixed = torch.randn(2, model.config.patches_per_image, model.backbone.config.hidden_size)
        outs = []
        for x in (torch.randn(2, *LATENT), torch.randn(2, *LATENT)):
            _, skip = model.patch_in(x, temb, add_time=True)
            outs.append(model.patch_out(fixed, temb, skip))
    assert outs[0].shape == (2, *LATENT)
    assert torch.allclose(outs[0], outs[1]) == (not skips)


def test_a_model_saved_before_patch_positions_loads_without_them(tokenizer, tmp_path):
    import json

    model = make_model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.pop("patch_positions") == "none"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = TransfusionModel.from_pretrained(tmp_path / "m")
    assert loaded.config.patch_positions == "none" and loaded.patch_pos() is None
    assert not list(loaded.patch_pos.parameters())


def test_a_model_saved_with_sampling_in_its_diffusion_section_loads(tokenizer, tmp_path):
    """config.json of models saved before the ``sampling`` section kept the sampler, steps and
    guidance in ``diffusion`` (and, before ``cfg_interval``, guided at every level)."""
    import json

    model = make_model(tokenizer, diffusion=diffusion_config("flow"), sampling=sampling_config("flow", steps=7))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    sampling = config.pop("sampling")
    assert sampling == {"sampler": "flow_euler", "steps": 7, "cfg_scale": 5.0, "cfg_interval": [0.0, 0.6]}
    old = {"sampler": "flow_euler", "sample_steps": 7, "cfg_scale": 3.0}  # no cfg_interval yet
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"diffusion": config["diffusion"] | old}))
    loaded = TransfusionModel.from_pretrained(tmp_path / "m").config
    assert loaded.sampling.model_dump() == {
        "sampler": "flow_euler",
        "steps": 7,
        "cfg_scale": 3.0,
        "cfg_interval": (0.0, 1.0),
    }
    assert loaded.diffusion == model.config.diffusion
    wrong = config | {"sampling": sampling | {"sampler": "ddim"}}  # a DDPM sampler for a flow model
    (tmp_path / "m" / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(BadInput, match=r"config.json: .*sampler 'ddim' does not fit a model trained with 'flow'"):
        TransfusionModel.from_pretrained(tmp_path / "m")


def test_load_refuses_missing_or_truncated_files(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved Transfusion model"):
        TransfusionModel.from_pretrained(tmp_path)
    make_model(tokenizer).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(ValueError, match="cannot load weights"):
        TransfusionModel.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pretrained_backbone_through_params(tokenizer, tmp_path, kind):
    """A tiny random LM saved with save_pretrained loads as the backbone, <boi>/<eoi> added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=290, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    base_tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    cfg = cls(
        vocab_size=len(base_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg)
    lm.save_pretrained(str(tmp_path / "lm"))
    base_tok.save_pretrained(str(tmp_path / "lm"))

    tok = build_tokenizer(section("tokenizer", pretrained=tmp_path / "lm"), [])
    assert len(tok) == len(base_tok) + 3  # <boi>, <eoi>, <pad>
    model = TransfusionModel.from_params(
        section("model", pretrained=tmp_path / "lm"), section("diffusion"), section("sampling"), tok, LATENT
    )
    emb = model.backbone.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) and model.backbone.config.model_type == kind
    torch.testing.assert_close(emb[: len(base_tok)], lm.get_input_embeddings().weight)
    batch = collator(model)([caption_to_image(ids(tok, "a red 4"), torch.randn(LATENT))])
    assert torch.isfinite(model.loss(batch, **RECIPE).total)


def test_freeze_text_trains_only_image_parts(tokenizer):
    model = make_model(tokenizer, freeze_text=True)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"time_embed", "patch_in", "patch_out"}
