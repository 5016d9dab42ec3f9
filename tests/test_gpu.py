"""GPU paths: the FlexAttention BlockMask equals the dense sdpa mask, and trains (run on a CUDA
machine; the forward is also checked on CPU in test_flex_cpu.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import LATENT, assert_twins_agree, attention_twins
from transfusion.data.collate import Collator, Example, caption_to_image, image_to_caption, text_example
from transfusion.data.tokenizer import train_bpe

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_flex_attention_matches_dense_sdpa(patch_encoder):
    tok = train_bpe(["a red 4 and a blue 3 to the left of a 7", "to be or not to be"] * 50, vocab_size=300)
    dense, flex = attention_twins(tok, patch_encoder, device="cuda")
    ids = tok("a red 4", add_special_tokens=False)["input_ids"]
    col = Collator(dense.special, dense.config.patches_per_image, 128)
    batch = col(
        [
            caption_to_image(ids, torch.zeros(LATENT)),
            Example([ids, torch.zeros(LATENT), ids, torch.zeros(LATENT)]),
            image_to_caption(torch.zeros(LATENT), ids),
            text_example(ids * 5),
        ]
    ).to("cuda")
    assert_twins_agree(dense, flex, batch, tol=1e-3)
    # and it trains: backward through the flex kernel
    flex.train()
    flex.loss(batch, loss_weight=5.0, noise_limit=0.5).total.backward()
