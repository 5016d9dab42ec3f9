"""MNIST scenes: RGB canvases of coloured MNIST digits in a grid, with GenEval-style captions.

A scene is a ``canvas`` x ``canvas`` image cut into ``grid`` x ``grid`` cells; 1-4 cells hold a
real MNIST digit scaled into the cell and coloured from the palette. Each scene is drawn for one
of GenEval's six categories and captioned from that category's template::

    single_object  "a 7"                      two_objects  "a 3 and a 7"
    counting       "three 5s"                 colors       "a red 4"
    position       "a 2 to the left of a 9"   color_attr   "a blue 3 and a yellow 8"
                   "a 6 above a 1" (also "to the right of", "below")

Beside each image we keep its structured content (the ground truth evaluation judges against)::

    {"category": "position", "relation": "left_of",
     "objects": [{"digit": 2, "color": "red", "row": 0, "col": 0},
                 {"digit": 9, "color": "cyan", "row": 0, "col": 1}]}

``parse_caption`` turns a caption back into a :class:`Prompt` and ``satisfies`` checks content
(real, or read from a generated image by a judge) against it: exactly the asked-for objects,
with the asked-for colours, counts and relation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from transfusion.config import CATEGORIES, ScenesConfig
from transfusion.data.sources import DigitSplit

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}
RELATIONS = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
PHRASE_RELATIONS = {v: k for k, v in RELATIONS.items()}


# ---------------------------------------------------------------------------------------------
# prompts: what a caption asks for
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    category: str
    digits: tuple[int, ...]  # one entry per asked object (counting repeats the digit)
    colors: tuple[str | None, ...] = field(default=())  # per object; None = any colour
    relation: str | None = None  # position: objects[0] <relation> objects[1]

    def text(self) -> str:
        """The prompt in words: the caption a scene satisfying it is written with."""
        d, c = self.digits, self.colors or (None,) * len(self.digits)
        match self.category:
            case "single_object":
                return f"a {d[0]}"
            case "two_objects":
                return f"a {d[0]} and a {d[1]}"
            case "counting":
                return f"{NUMBER_WORDS[len(d)]} {d[0]}s"
            case "colors":
                return f"a {c[0]} {d[0]}"
            case "position":
                return f"a {d[0]} {RELATIONS[self.relation]} a {d[1]}"  # type: ignore[index]
            case "color_attr":
                return f"a {c[0]} {d[0]} and a {c[1]} {d[1]}"
        raise ValueError(f"unknown category {self.category!r}")


_RX_COLORED = r"a (?P<c{i}>[a-z]+) (?P<d{i}>\d)"
_PATTERNS = [
    ("color_attr", re.compile(f"^{_RX_COLORED.format(i=0)} and {_RX_COLORED.format(i=1)}$")),
    ("two_objects", re.compile(r"^a (?P<d0>\d) and a (?P<d1>\d)$")),
    ("position", re.compile(r"^a (?P<d0>\d) (?P<rel>to the left of|to the right of|above|below) a (?P<d1>\d)$")),
    ("counting", re.compile(r"^(?P<n>two|three|four) (?P<d0>\d)s$")),
    ("colors", re.compile(f"^{_RX_COLORED.format(i=0)}$")),
    ("single_object", re.compile(r"^a (?P<d0>\d)$")),
]


def parse_caption(caption: str, palette: dict | None = None) -> Prompt | None:
    """The :class:`Prompt` a template caption asks for, or ``None`` if it fits no template."""
    text = " ".join(caption.strip().lower().rstrip(".").split())
    for category, rx in _PATTERNS:
        m = rx.match(text)
        if m is None:
            continue
        g = m.groupdict()
        colors = tuple(g[k] for k in ("c0", "c1") if g.get(k))
        if palette is not None and any(c not in palette for c in colors):
            return None
        if category == "counting":
            return Prompt(category, (int(g["d0"]),) * WORD_NUMBERS[g["n"]])
        digits = tuple(int(g[k]) for k in ("d0", "d1") if g.get(k))
        relation = PHRASE_RELATIONS.get(g.get("rel", ""), None)
        return Prompt(category, digits, colors, relation)
    return None


def satisfies(content: dict, prompt: Prompt) -> bool:
    """Does a scene's content hold exactly what ``prompt`` asks (objects, colours, relation)?"""
    objects = content["objects"]
    if sorted(o["digit"] for o in objects) != sorted(prompt.digits):
        return False
    if prompt.colors:
        want = sorted(zip(prompt.digits, prompt.colors))
        if sorted((o["digit"], o["color"]) for o in objects) != want:
            return False
    if prompt.relation is not None:
        first = next(o for o in objects if o["digit"] == prompt.digits[0])
        second = next(o for o in objects if o["digit"] == prompt.digits[1])
        dr, dc = second["row"] - first["row"], second["col"] - first["col"]
        ok = {
            "left_of": dc > 0 and dr == 0,
            "right_of": dc < 0 and dr == 0,
            "above": dr > 0 and dc == 0,
            "below": dr < 0 and dc == 0,
        }[prompt.relation]
        if not ok:
            return False
    return True


def true_captions(content: dict) -> list[str]:
    """Every template caption that ``content`` satisfies: a scene of one category is also true
    of others (a "two objects" scene in one row is a "position" scene too, and every object has
    a colour). Counting scenes (repeated digits) have their one caption."""
    objects = content["objects"]
    digits = [o["digit"] for o in objects]
    prompts: list[Prompt] = []
    if len(objects) == 1:
        prompts += [Prompt("single_object", (digits[0],)), Prompt("colors", (digits[0],), (objects[0]["color"],))]
    elif len(set(digits)) < len(digits) or len(objects) > 2:
        prompts.append(Prompt("counting", (digits[0],) * len(digits)))
    else:
        for a, b in (objects, objects[::-1]):
            prompts.append(Prompt("two_objects", (a["digit"], b["digit"])))
            prompts.append(Prompt("color_attr", (a["digit"], b["digit"]), (a["color"], b["color"])))
            prompts += [Prompt("position", (a["digit"], b["digit"]), (), rel) for rel in RELATIONS]
    return [p.text() for p in prompts if satisfies(content, p)]


# ---------------------------------------------------------------------------------------------
# drawing scenes
# ---------------------------------------------------------------------------------------------
def _resize_digits(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, size, size) float32 in [0, 1], antialiased."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.squeeze(1).clamp_(0, 1).numpy()


def _draw_prompt(rng: np.random.Generator, category: str, cfg: ScenesConfig) -> tuple[Prompt, list[tuple[int, int]]]:
    """Pick the objects of one scene and their cells for ``category``."""
    g, colours = cfg.grid, list(cfg.palette)
    cells = [(r, c) for r in range(g) for c in range(g)]

    def pick_cells(n: int) -> list[tuple[int, int]]:
        return [cells[i] for i in rng.choice(len(cells), size=n, replace=False)]

    def two_digits() -> tuple[int, int]:
        a, b = rng.choice(10, size=2, replace=False)
        return int(a), int(b)

    if category in ("single_object", "colors"):
        d = int(rng.integers(10))
        colour = str(rng.choice(colours)) if category == "colors" else None
        return Prompt(category, (d,), (colour,) if colour else ()), pick_cells(1)
    if category == "two_objects":
        return Prompt(category, two_digits()), pick_cells(2)
    if category == "counting":
        n = int(rng.integers(2, min(4, len(cells)) + 1))
        return Prompt(category, (int(rng.integers(10)),) * n), pick_cells(n)
    if category == "color_attr":
        c0, c1 = rng.choice(colours, size=2, replace=False)
        return Prompt(category, two_digits(), (str(c0), str(c1))), pick_cells(2)
    if category == "position":
        relation = str(rng.choice(list(RELATIONS)))
        line, a, b = (int(x) for x in (rng.integers(g), *sorted(rng.choice(g, size=2, replace=False))))
        horizontal = relation in ("left_of", "right_of")
        first, second = ((line, a), (line, b)) if horizontal else ((a, line), (b, line))
        if relation in ("right_of", "below"):
            first, second = second, first
        return Prompt(category, two_digits(), (), relation), [first, second]
    raise ValueError(f"unknown category {category!r}")


def compose_scenes(digits: DigitSplit, n: int, cfg: ScenesConfig, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Draw ``n`` scenes from ``digits``: (N, canvas, canvas, 3) uint8 and one record each.

    A record is ``{"caption": str, "content": {...}, "mnist_index": [...]}``.
    """
    rng = np.random.default_rng(seed)
    cell = cfg.canvas // cfg.grid
    glyphs = _resize_digits(digits.images, cell)  # (M, cell, cell)
    by_digit = [np.flatnonzero(digits.labels == d) for d in range(10)]
    names = [c for c in CATEGORIES if cfg.categories.get(c, 0) > 0]
    weights = np.array([cfg.categories[c] for c in names], dtype=np.float64)
    palette = {k: np.asarray(v, dtype=np.float32) / 255.0 for k, v in cfg.palette.items()}

    images = np.zeros((n, cfg.canvas, cfg.canvas, 3), dtype=np.uint8)
    records = []
    for i in range(n):
        category = names[rng.choice(len(names), p=weights / weights.sum())]
        prompt, cells = _draw_prompt(rng, category, cfg)
        canvas = np.zeros((cfg.canvas, cfg.canvas, 3), dtype=np.float32)
        objects, sources = [], []
        for k, (digit, (r, c)) in enumerate(zip(prompt.digits, cells)):
            colour = prompt.colors[k] if prompt.colors else str(rng.choice(list(palette)))
            idx = int(rng.choice(by_digit[digit]))
            canvas[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = glyphs[idx][..., None] * palette[colour]
            objects.append({"digit": digit, "color": colour, "row": r, "col": c})
            sources.append(idx)
        images[i] = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
        content = {"category": category, "objects": objects}
        if prompt.relation:
            content["relation"] = prompt.relation
        records.append({"caption": prompt.text(), "content": content, "mnist_index": sources})
    return images, records
