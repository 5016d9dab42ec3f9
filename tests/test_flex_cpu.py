"""FlexAttention checked on CPU (forward only: the locked torch has no CPU backward for it): the
whole model with `attention: flex` equals `attention: sdpa` on the same weights, on packed
batches with several documents, several images per document, caption-first and image-first
examples and padding; and the comparison fails when the flex rule lets an image see a later one."""

from __future__ import annotations

import pytest
import torch

from conftest import LATENT, assert_twins_agree, attention_twins
from transfusion.data.collate import Collator, Example, caption_to_image, image_to_caption, text_example
from transfusion.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def models():
    tok = train_bpe(["a red 4 and a blue 3 to the left of a 7", "to be or not to be"] * 50, vocab_size=300)
    return tok, *attention_twins(tok)


def _batch(tok, model):
    """Packed rows of at most 32 tokens: caption->image, a document with two images, image->caption,
    text and caption->image, several documents to a row, the last row padded."""
    ids = tok("a red 4", add_special_tokens=False)["input_ids"]
    z = lambda: torch.randn(LATENT)  # noqa: E731
    col = Collator(model.special, model.config.patches_per_image, 32)
    examples = [
        caption_to_image(ids, z()),
        Example([ids, z(), ids, z()]),
        image_to_caption(z(), ids),
        text_example(ids * 3),
        caption_to_image(ids, z()),
    ]
    return col(examples)


def _compare(models, seed: int = 0) -> None:
    tok, dense, flex = models
    torch.manual_seed(seed)
    batch = _batch(tok, dense)
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
