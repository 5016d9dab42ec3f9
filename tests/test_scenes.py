"""MNIST scenes: captions match structured content, pixels match content, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import section
from transfusion.config import CATEGORIES
from transfusion.data.scenes import Prompt, _resize_digits, compose_scenes, parse_caption, satisfies, true_captions
from transfusion.data.sources import DigitSplit


def scenes_cfg(**changes):
    """params.yaml's data.scenes with ``changes``."""
    base = section("data").scenes
    return type(base).model_validate({**base.model_dump(), **changes})


@pytest.fixture(scope="module")
def digits() -> DigitSplit:
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    images = rng.integers(0, 256, size=(200, 28, 28)).astype(np.uint8)  # every glyph unique
    return DigitSplit(images, labels)


@pytest.fixture(scope="module")
def scenes(digits):
    cfg = scenes_cfg(n_train=10)
    return cfg, *compose_scenes(digits, 600, cfg, seed=3)


def test_every_category_drawn_and_caption_round_trips(scenes):
    cfg, _, records = scenes
    assert {r["content"]["category"] for r in records} == set(CATEGORIES)
    for r in records:
        prompt = parse_caption(r["caption"], cfg.palette)
        assert prompt is not None, r["caption"]
        assert prompt.category == r["content"]["category"]
        assert prompt.text() == r["caption"]


def test_captions_match_structured_content(scenes):
    cfg, _, records = scenes
    for r in records:
        content = r["content"]
        objects = content["objects"]
        assert 1 <= len(objects) <= 4
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)  # one digit per cell
        assert all(o["color"] in cfg.palette for o in objects)
        assert satisfies(content, parse_caption(r["caption"]))


def test_a_shuffled_caption_is_mostly_wrong(scenes):
    _, _, records = scenes
    captions = [r["caption"] for r in records]
    shuffled = captions[1:] + captions[:1]
    hits = sum(satisfies(r["content"], parse_caption(c)) for r, c in zip(records, shuffled))
    assert hits < 0.1 * len(records)


def test_pixels_hold_exactly_the_listed_digits(scenes, digits):
    cfg, images, records = scenes
    cell = cfg.canvas // cfg.grid
    glyphs = _resize_digits(digits.images, cell)
    for img, r in zip(images[:100], records[:100]):
        filled = set()
        for obj, idx in zip(r["content"]["objects"], r["mnist_index"]):
            assert digits.labels[idx] == obj["digit"]
            crop = img[obj["row"] * cell : (obj["row"] + 1) * cell, obj["col"] * cell : (obj["col"] + 1) * cell]
            colour = np.asarray(cfg.palette[obj["color"]], np.float32) / 255
            expected = np.clip(np.rint(glyphs[idx][..., None] * colour * 255), 0, 255)
            np.testing.assert_array_equal(crop, expected.astype(np.uint8))
            filled.add((obj["row"], obj["col"]))
        for row in range(cfg.grid):
            for col in range(cfg.grid):
                if (row, col) not in filled:
                    assert img[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].max() == 0


def test_position_relations_are_geometric(scenes):
    _, _, records = scenes
    seen = set()
    for r in records:
        c = r["content"]
        if c["category"] != "position":
            continue
        a, b = c["objects"]
        seen.add(c["relation"])
        expect = {"left_of": (0, 1), "right_of": (0, -1), "above": (1, 0), "below": (-1, 0)}[c["relation"]]
        assert (np.sign(b["row"] - a["row"]), np.sign(b["col"] - a["col"])) == expect
    assert seen == {"left_of", "right_of", "above", "below"}


def test_true_captions_are_all_true_and_name_what_the_own_caption_leaves_out(scenes):
    """Every redrawn caption parses and holds for the scene; the scene's own caption is one of
    them; two objects in one row or column also get their relation (both ways) and colours;
    two objects on a diagonal get no relation; a shuffled scene's captions are mostly false."""
    cfg, _, records = scenes
    for r in records:
        content, options = r["content"], true_captions(r["content"])
        assert r["caption"] in options
        assert all(satisfies(content, parse_caption(c, cfg.palette)) for c in options)
        categories = {parse_caption(c).category for c in options}
        objects = content["objects"]
        if len(objects) == 2 and objects[0]["digit"] != objects[1]["digit"]:
            aligned = objects[0]["row"] == objects[1]["row"] or objects[0]["col"] == objects[1]["col"]
            assert categories == {"two_objects", "color_attr"} | ({"position"} if aligned else set())
            assert sum(parse_caption(c).category == "position" for c in options) == (2 if aligned else 0)
        elif len(objects) == 1:
            assert categories == {"single_object", "colors"}
        else:
            assert options == [r["caption"]]  # counting
    others = [(r, c) for r, s in zip(records, records[1:]) for c in true_captions(s["content"])]
    assert sum(satisfies(r["content"], parse_caption(c)) for r, c in others) < 0.1 * len(others)


def test_same_seed_same_scenes(digits):
    cfg = section("data").scenes
    a_img, a_rec = compose_scenes(digits, 50, cfg, seed=7)
    b_img, b_rec = compose_scenes(digits, 50, cfg, seed=7)
    c_img, _ = compose_scenes(digits, 50, cfg, seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    assert a_rec == b_rec
    assert not np.array_equal(a_img, c_img)


def test_category_weights_and_palette_from_params(digits):
    cfg = scenes_cfg(categories={"counting": 1.0}, palette={"red": (255, 0, 0), "blue": (0, 0, 255)}, canvas=48, grid=3)
    images, records = compose_scenes(digits, 40, cfg, seed=0)
    assert images.shape == (40, 48, 48, 3)
    assert all(r["content"]["category"] == "counting" for r in records)
    assert {o["color"] for r in records for o in r["content"]["objects"]} <= {"red", "blue"}


@pytest.mark.parametrize(
    "caption",
    [
        "a 7",
        "a 3 and a 7",
        "three 5s",
        "two 0s",
        "four 9s",
        "a red 4",
        "a 2 to the left of a 9",
        "a 2 to the right of a 9",
        "a 6 above a 1",
        "a 6 below a 1",
        "a blue 3 and a yellow 8",
    ],
)
def test_every_template_parses_back(caption):
    prompt = parse_caption(caption)
    assert isinstance(prompt, Prompt) and prompt.text() == caption


def test_unknown_captions_do_not_parse():
    assert parse_caption("a cat on a mat") is None
    assert parse_caption("a purple 3", palette={"red": (1, 2, 3)}) is None


def _folder(root, lines: list[str]):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (20, 30), (10, 200, 10)).save(root / name)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('{"file": "../outside.png", "caption": "x"}', "'../outside.png' is outside"),
        ('{"file": "/etc/passwd", "caption": "x"}', "'/etc/passwd' is outside"),
        ('{"file": "sub/../../outside.png", "caption": "x"}', "is outside"),
        ('{"file": 7, "caption": "x"}', '"file" must be a path string, got 7'),
        ('{"file": ["a.png"], "caption": "x"}', '"file" must be a path string'),
        ('{"caption": "x"}', 'expected {"file": ..., "caption": ...}'),
        ('{"file": "missing.png", "caption": "x"}', "missing.png: no such image file"),
    ],
)
def test_caption_folder_entries_stay_inside_the_folder(tmp_path, entry, expected):
    from transfusion.data.sources import load_caption_folder
    from transfusion.errors import DataError

    (tmp_path / "outside.png").write_bytes(b"")  # what an escaping entry would reach
    good = ['{"file": "a.png", "caption": "a"}', '{"file": "b.png", "caption": "b"}']
    folder = _folder(tmp_path / "mine", [*good, entry, '{"file": "c.png", "caption": "c"}'])
    with pytest.raises(DataError) as err:
        load_caption_folder(folder, 32)
    message = str(err.value)
    assert message.startswith(f"{folder / 'captions.jsonl'}:3: ") and expected in message, message


def test_caption_folder_refuses_a_huge_image_from_its_header(tmp_path):
    from conftest import png_claiming
    from transfusion.data.sources import load_caption_folder
    from transfusion.errors import DataError

    folder = _folder(tmp_path / "mine", ['{"file": "a.png", "caption": "a"}', '{"file": "big.png", "caption": "b"}'])
    (folder / "big.png").write_bytes(png_claiming(30000, 30000))
    with pytest.raises(DataError, match=r"captions.jsonl:2: .*big.png: 30000x30000 pixels, more than"):
        load_caption_folder(folder, 32)
    images, records = load_caption_folder(_folder(tmp_path / "ok", [
        '{"file": "a.png", "caption": "a"}', '{"file": "b.png", "caption": "b"}', '{"file": "c.png", "caption": "c"}'
    ]), 32)  # fmt: skip
    assert images.shape == (3, 32, 32, 3) and [r["caption"] for r in records] == ["a", "b", "c"]
