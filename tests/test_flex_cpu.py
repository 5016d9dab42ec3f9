"""FlexAttention checked on CPU (forward only: the locked torch has no CPU backward for it): the
whole model with `attention: flex` equals `attention: sdpa` on the same weights, on packed
batches with several documents, several images per document, caption-first and image-first
examples and padding; and the comparison fails when the flex rule lets an image see a later one.
The KV-cached sampler with flex (its dense masks over the cache become BlockMasks) equals the
uncached one and the sdpa model, for images (with CFG) and text."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_twins_agree, attention_twins, mixed_rows
from transfusion.data.tokenizer import train_bpe
from transfusion.diffusion import build_scheduler
from transfusion.sampling import generate_text, sample_latents


@pytest.fixture(scope="module")
def models():
    tok = train_bpe(["a red 4 and a blue 3 to the left of a 7", "to be or not to be"] * 50, vocab_size=300)
    return tok, *attention_twins(tok)


def _compare(models, seed: int = 0) -> None:
    tok, dense, flex = models
    torch.manual_seed(seed)
    batch = mixed_rows(tok, dense, 32, seed)  # several documents to a row, the last row padded
    assert batch.valid.shape[0] >= 2 and not batch.valid.all()  # packed rows, with padding
    assert int(batch.image_block.max()) >= 3  # several images, one block each
    assert_twins_agree(dense, flex, batch, tol=1e-4)


def test_flex_attention_equals_sdpa_on_cpu(models):
    _compare(models)


def test_the_comparison_fails_when_an_image_may_see_a_later_image(models, monkeypatch):
    from torch.nn.attention.flex_attention import create_block_mask

    import transfusion.model.transfusion as network

    def leaky(document, image_block, valid):  # images of a document see each other, later ones too
        B, L = document.shape

        def mask_mod(b, h, q, kv):
            same_doc = document[b, q] == document[b, kv]
            both_images = (image_block[b, q] >= 0) & (image_block[b, kv] >= 0)
            return (same_doc & ((kv <= q) | both_images) & valid[b, kv]) | (q == kv)

        return create_block_mask(mask_mod, B, None, L, L, device=str(document.device))

    monkeypatch.setattr(network, "hybrid_block_mask", leaky)
    with pytest.raises(AssertionError):
        _compare(models)


def _latents(model, captions, use_cache: bool) -> torch.Tensor:
    sched = build_scheduler(model.config.diffusion, model.config.sampling.sampler)
    # CFG guided at high noise only: steps run both the [cond; uncond] rows and the cond rows alone
    return sample_latents(model, captions, sched, 4, 3.0, seed=1, use_cache=use_cache, cfg_interval=(0.5, 1.0))


def test_cached_sampler_with_flex_equals_uncached_and_sdpa(models):
    tok, dense, flex = models
    captions = [tok(c, add_special_tokens=False)["input_ids"] for c in ("a red 4", "a 2 to the left of a 9")]
    assert len(captions[0]) != len(captions[1])  # left padding in the cache
    cached, uncached = _latents(flex, captions, True), _latents(flex, captions, False)
    reference = _latents(dense, captions, True)
    start = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    assert (reference - start).abs().mean() > 0.1  # the network moved the latents: not a vacuous match
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-4)


def _compare_text(models) -> None:
    tok, dense, flex = models
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("to be", "a red 4 and a blue")]
    ids, logits = generate_text(flex, prompts, max_new_tokens=3, return_logits=True)
    ids_ref, logits_ref = generate_text(flex, prompts, max_new_tokens=3, use_cache=False, return_logits=True)
    _, logits_sdpa = generate_text(dense, prompts, max_new_tokens=3, return_logits=True)
    assert ids == ids_ref
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, logits_sdpa, rtol=1e-4, atol=1e-4)


def test_cached_text_generation_with_flex_equals_uncached(models):
    _compare_text(models)


def test_the_text_comparison_fails_when_the_cache_mask_is_ignored(models, monkeypatch):
    import transfusion.model.transfusion as network
    from transfusion.model.mask import dense_to_block_mask

    monkeypatch.setattr(network, "dense_to_block_mask", lambda mask: dense_to_block_mask(torch.ones_like(mask)))
    with pytest.raises(AssertionError):  # the shorter prompt's left padding is seen
        _compare_text(models)
