"""GPU paths: the FlexAttention BlockMask equals the dense sdpa mask (run on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch

from conftest import section
from transfusion.data.collate import Collator, Example, caption_to_image, image_to_caption, text_example
from transfusion.data.tokenizer import train_bpe
from transfusion.model import TransfusionModel

pytestmark = pytest.mark.gpu
LATENT = (4, 8, 8)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_flex_attention_matches_dense_sdpa(patch_encoder):
    tok = train_bpe(["a red 4 and a blue 3 to the left of a 7", "to be or not to be"] * 50, vocab_size=300)
    torch.manual_seed(0)
    dense = (
        TransfusionModel.from_params(
            section("model", patch_encoder=patch_encoder), section("diffusion"), section("sampling"), tok, LATENT
        )
        .cuda()
        .eval()
    )
    flex = TransfusionModel(dense.config.model_copy(update={"attention": "flex"})).cuda().eval()
    flex.load_state_dict(dense.state_dict())
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
    x = torch.randn(batch.images.shape, device="cuda")
    t = torch.rand(len(x), device="cuda") * 999
    with torch.no_grad():
        hd, pd = dense(batch, x, t)
        hf, pf = flex(batch, x, t)
    valid = batch.valid
    torch.testing.assert_close(hf[valid], hd[valid], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pf, pd, rtol=1e-3, atol=1e-3)
    # and it trains: backward through the flex kernel
    flex.train()
    flex.loss(batch, loss_weight=5.0, noise_limit=0.5).total.backward()
