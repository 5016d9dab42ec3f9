"""Binding diagnostics (transfusion.eval.binding): the swapped captions are false and otherwise
identical, and the two rankings measure exactly the loss difference they claim to."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, diffusion_config
from transfusion.data.scenes import parse_caption, satisfies
from transfusion.eval.binding import BUCKETS, binding_scores, caption_nll, diffusion_mse, flipped, pairs

POSITION = {
    "caption": "a 2 to the left of a 9",
    "content": {
        "category": "position",
        "relation": "left_of",
        "objects": [
            {"digit": 2, "color": "red", "row": 0, "col": 0},
            {"digit": 9, "color": "cyan", "row": 0, "col": 1},
        ],
    },
}
COLOURS = {
    "caption": "a blue 3 and a yellow 8",
    "content": {
        "category": "color_attr",
        "objects": [
            {"digit": 3, "color": "blue", "row": 1, "col": 0},
            {"digit": 8, "color": "yellow", "row": 0, "col": 1},
        ],
    },
}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("record", "want"),
    [(POSITION, "a 2 to the right of a 9"), (COLOURS, "a yellow 3 and a blue 8")],
)
def test_the_twin_caption_is_one_swap_away_and_false_of_the_scene(record, want):
    prompt = parse_caption(record["caption"])
    twin = flipped(prompt)
    assert twin.text() == want
    assert satisfies(record["content"], prompt) and not satisfies(record["content"], twin)
    assert sorted(twin.digits) == sorted(prompt.digits) and sorted(twin.colors) == sorted(prompt.colors)
    assert flipped(flipped(prompt)) == prompt
    for other in ("a 7", "a 3 and a 7", "three 5s", "a red 4"):
        assert flipped(parse_caption(other)) is None


def test_pairs_take_only_the_compositional_categories_up_to_the_cap():
    records = [POSITION, {"caption": "a 7"}, COLOURS, POSITION, POSITION]
    got = pairs(records, per_category=2)
    assert [i for i, _, _ in got["position"]] == [0, 3]
    assert got["color_attr"] == [(2, "a blue 3 and a yellow 8", "a yellow 3 and a blue 8")]


def test_caption_nll_is_the_summed_token_loss_and_independent_of_the_batch(text_tokenizer):
    """Batched and padded NLLs equal one-by-one NLLs, and each equals the sum of the caption's
    teacher-forced token losses (+ <eos>) computed from the full logits."""
    model = build_tiny_model(text_tokenizer).eval()
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = [ids(text_tokenizer, c) for c in ("a 2 to the left of a 9", "a 7", "a blue 3 and a yellow 8")]
    batched = caption_nll(model, latents, captions)
    single = torch.cat([caption_nll(model, latents[i : i + 1], captions[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    # by hand: <bos> <boi> P patches <eoi> caption <eos>, logits at <eoi> .. last caption token
    from transfusion.data.collate import image_to_caption
    from transfusion.sampling import example_collator

    batch = example_collator(model)([image_to_caption(latents[1], captions[1])])
    with torch.no_grad():
        hidden, _ = model(batch, latents[1:2], torch.zeros(1))
        logp = model.text_logits(hidden)[0].float().log_softmax(-1)
    start = 2 + model.config.patches_per_image  # the <eoi> position
    targets = captions[1] + [model.special.eos]
    want = -sum(logp[start + j, t] for j, t in enumerate(targets))
    assert float(batched[1]) == pytest.approx(float(want), rel=1e-4)


def test_diffusion_mse_uses_the_same_noise_for_every_caption_and_any_batch_size(text_tokenizer):
    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow")).eval()
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    captions = [ids(text_tokenizer, "a 2 to the left of a 9")] * 5
    a = diffusion_mse(model, latents, captions, seed=3)
    b = diffusion_mse(model, latents, captions, seed=3, batch_size=3)
    assert a.shape == (len(BUCKETS), 5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not torch.equal(a, diffusion_mse(model, latents, captions, seed=4))


def test_a_model_blind_to_caption_tokens_writes_at_exactly_chance(text_tokenizer):
    """Zero every token embedding: a colour-swapped caption (the same tokens reordered, so the
    same length) gives inputs identical to the true one, so every diffusion comparison is a tie
    and the write ranking is exactly 0.5. (This test tokenizer splits "left" and "right" into
    different numbers of tokens, so position captions differ in length and are only checked to
    be scored.) The read ranking compares two different target sequences: a number in [0, 1]."""
    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow")).eval()
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight.zero_()
    records = [POSITION, COLOURS] * 3
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = binding_scores(model, text_tokenizer, latents, records, per_category=10)
    assert got["binding_write_color_attr"] == 0.5
    assert all(got[f"binding_write_color_attr_b{k}"] == 0.5 for k in range(len(BUCKETS)))
    for category in ("position", "color_attr"):
        assert got[f"binding_scenes_{category}"] == 3
        assert 0.0 <= got[f"binding_write_{category}"] <= 1.0
        assert 0.0 <= got[f"binding_read_{category}"] <= 1.0
        assert got[f"binding_read_{category}_se"] <= 0.5 / 3**0.5 + 1e-9
