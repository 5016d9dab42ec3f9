"""The collator's layout (as documented in its docstring) and the mixture stream."""

from __future__ import annotations

import numpy as np
import torch

from conftest import section
from transfusion.data.collate import (
    PAD,
    PATCH,
    TEXT,
    TIME,
    Collator,
    Example,
    SpecialIds,
    caption_to_image,
    image_to_caption,
    text_example,
)

S = SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4)
Z = torch.zeros(4, 8, 8)


def test_documented_example_layout():
    batch = Collator(S, patches_per_image=4, max_length=64)([caption_to_image([11, 12], Z), image_to_caption(Z, [13])])
    ids = batch.input_ids[0].tolist()
    assert ids == [1, 11, 12, 3, 0, 0, 0, 0, 4, 2, 1, 3, 0, 0, 0, 0, 4, 13, 2]
    assert batch.modality[0].tolist() == [TEXT] * 4 + [PATCH] * 4 + [TEXT] * 4 + [PATCH] * 4 + [TEXT] * 3
    assert batch.image_block[0].tolist() == [-1] * 4 + [0] * 4 + [-1] * 4 + [1] * 4 + [-1] * 3
    assert batch.patch_index[0].tolist() == [-1] * 4 + [0, 1, 2, 3] + [-1] * 4 + [0, 1, 2, 3] + [-1] * 3
    assert batch.document[0].tolist() == [0] * 10 + [1] * 9
    assert batch.position_ids[0].tolist() == list(range(10)) + list(range(9))
    x = -100
    assert batch.labels[0].tolist() == [11, 12, 3, x, x, x, x, 4, 2, x, 3, x, x, x, x, 4, 13, 2, x]
    assert batch.image_first.tolist() == [False, True]
    assert batch.images.shape == (2, 4, 8, 8)


def test_time_token_and_several_images_per_example():
    ex = Example([[11], Z, [12], Z + 1])
    batch = Collator(S, patches_per_image=4, max_length=64, time_token=True)([ex])
    mod = batch.modality[0].tolist()
    assert mod.count(TIME) == 2 and mod.count(PATCH) == 8
    time_pos = [i for i, m in enumerate(mod) if m == TIME]
    assert [batch.input_ids[0, i - 1].item() for i in time_pos] == [S.boi, S.boi]
    assert batch.image_block[0, time_pos].tolist() == [0, 1]
    assert batch.image_first.tolist() == [False, False]
    assert torch.equal(batch.images[1], Z + 1)


def test_packing_padding_and_truncation():
    col = Collator(S, patches_per_image=4, max_length=12)
    batch = col([text_example(list(range(10, 30))), caption_to_image([11], Z), text_example([5, 6])])
    assert batch.input_ids.shape == (3, 12)
    assert batch.input_ids[0].tolist() == [1] + list(range(10, 21))  # truncated text chunk
    assert batch.valid[2].tolist() == [True] * 4 + [False] * 8
    assert (batch.modality[~batch.valid] == PAD).all() and (batch.labels[~batch.valid] == -100).all()


def test_mixture_stream_follows_weights_and_resumes(tiny_pipeline):
    from transfusion.data.mixture import ExampleStream, tokenize_corpus
    from transfusion.data.prepare import read_text_split
    from transfusion.data.tokenizer import load_tokenizer

    p = tiny_pipeline
    tok = load_tokenizer(p.paths.tokenizer)
    text = tokenize_corpus(tok, read_text_split(p.paths.text, "train"))
    stream = ExampleStream(
        p.paths.latents, text, tok, section("mixture", text=1, caption_to_image=4, image_to_caption=1), 32, seed=0
    )
    kinds = []
    for ex in stream.take(600):
        if len(ex.parts) == 1:
            kinds.append("text")
        else:
            kinds.append("c2i" if isinstance(ex.parts[0], list) else "i2c")
    counts = {k: kinds.count(k) / 600 for k in ("text", "c2i", "i2c")}
    assert (
        abs(counts["text"] - 1 / 6) < 0.05 and abs(counts["c2i"] - 4 / 6) < 0.06 and abs(counts["i2c"] - 1 / 6) < 0.05
    )

    a = ExampleStream(p.paths.latents, text, tok, section("mixture"), 32, seed=1)
    first = a.take(30)
    b = ExampleStream(p.paths.latents, text, tok, section("mixture"), 32, seed=1)
    b.load_state({"drawn": 20})
    for x, y in zip(first[20:], b.take(10)):
        assert len(x.parts) == len(y.parts)
        for u, v in zip(x.parts, y.parts):
            assert torch.equal(u, v) if torch.is_tensor(u) else u == v
    # a text example is a window of the tokenized corpus (not a re-tokenized or shuffled chunk)
    windows = [ex.parts[0] for ex in first if len(ex.parts) == 1]
    assert windows
    for chunk in windows:
        starts = np.flatnonzero(text[: len(text) - len(chunk) + 1] == chunk[0])
        assert any(np.array_equal(text[s : s + len(chunk)], chunk) for s in starts), chunk[:8]


def test_recaption_redraws_only_caption_first_captions_and_only_true_ones(tiny_pipeline):
    """recaption 1: every caption->image pair carries a caption true of its own scene, often not
    the scene's own; image->caption pairs, text and the images themselves are as with 0."""
    from transfusion.data.latents import LatentReader
    from transfusion.data.mixture import ExampleStream
    from transfusion.data.scenes import parse_caption, satisfies
    from transfusion.data.tokenizer import load_tokenizer

    p = tiny_pipeline
    tok = load_tokenizer(p.paths.tokenizer)
    text = np.arange(1000, dtype=np.int32) % 200 + 10
    weights = {"text": 1, "caption_to_image": 3, "image_to_caption": 1}
    plain = ExampleStream(p.paths.latents, text, tok, section("mixture", **weights, recaption=0.0), 32, seed=2)
    redrawn = ExampleStream(p.paths.latents, text, tok, section("mixture", **weights, recaption=1.0), 32, seed=2)
    rows = iter(LatentReader(p.paths.latents, "train", shuffle=True, seed=2, repeat=True))
    changed = c2i = 0
    for a, b in zip(plain.take(300), redrawn.take(300)):
        assert len(a.parts) == len(b.parts)
        if len(a.parts) == 1:
            assert a.parts == b.parts
            continue
        _, record = next(rows)
        if isinstance(a.parts[0], list):  # caption -> image
            c2i += 1
            assert torch.equal(a.parts[1], b.parts[1]) and tok.decode(a.parts[0]) == record["caption"]
            caption = tok.decode(b.parts[0])
            assert satisfies(record["content"], parse_caption(caption)), (caption, record)
            changed += caption != record["caption"]
        else:
            assert torch.equal(a.parts[0], b.parts[0]) and a.parts[1] == b.parts[1]
    assert c2i > 100 and changed > 0.3 * c2i
