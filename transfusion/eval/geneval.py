"""GenEval-style compositional score on MNIST scenes, and GenEval's file formats.

Prompts come from test-scene captions, ``prompts_per_category`` for each of GenEval's six
categories (or from a GenEval ``evaluation_metadata.jsonl``). The judge reads each generated
image into objects (digit, colour, cell, confidence), and two rules score them:

- ``geneval_*`` -- GenEval's own rule (``evaluate`` in its ``evaluate_images.py``), applied to the
  prompt's GenEval metadata: each ``include`` clause needs ``count`` objects of its class (others
  may be there too); colour and position are checked on the ``count`` most confident of them;
  position uses GenEval's box geometry (``relative_position``, threshold 0.1); an ``exclude``
  clause fails the image when ``count`` or more of its class are there (counting prompts carry
  ``exclude: count n + 1``, so "three 5s" needs exactly three 5s). Comparable in kind with
  published GenEval numbers.
- ``scene_match_*`` -- the whole scene must be exactly what the caption says and nothing else
  (``scenes.satisfies``): stricter.

The overall score is the mean of the six category accuracies (GenEval's rule). Images are
written in GenEval's layout so its own scorer can run on them::

    <root>/00000/metadata.jsonl        one line: the prompt's metadata
    <root>/00000/samples/0000.png ...  the images for that prompt
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transfusion.config import CATEGORIES
from transfusion.data.scenes import RELATIONS, Prompt, parse_caption, satisfies
from transfusion.errors import BadInput

# our category names -> GenEval's tags
TAGS = {
    "single_object": "single_object",
    "two_objects": "two_object",
    "counting": "counting",
    "colors": "colors",
    "position": "position",
    "color_attr": "color_attr",
}
CATEGORY_OF_TAG = {v: k for k, v in TAGS.items()}


POSITION_THRESHOLD = 0.1  # GenEval's default `position_threshold`
GENEVAL_RELATIONS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}


def metadata(prompt: Prompt) -> dict:
    """GenEval's metadata for one prompt: tag, include (class, count, color, position),
    exclude (counting: ``count`` n + 1), prompt -- as in GenEval's ``evaluation_metadata.jsonl``."""
    meta: dict = {"tag": TAGS[prompt.category]}
    if prompt.category == "counting":
        digit, n = str(prompt.digits[0]), len(prompt.digits)
        meta["include"] = [{"class": digit, "count": n}]
        meta["exclude"] = [{"class": digit, "count": n + 1}]
    elif prompt.relation is not None:  # GenEval: the target first, then the subject "<relation> 0"
        subject, target = prompt.digits
        meta["include"] = [
            {"class": str(target), "count": 1},
            {"class": str(subject), "count": 1, "position": [GENEVAL_RELATIONS[prompt.relation], 0]},
        ]
    else:
        meta["include"] = []
        for k, digit in enumerate(prompt.digits):
            item: dict = {"class": str(digit), "count": 1}
            if prompt.colors:
                item["color"] = prompt.colors[k]
            meta["include"].append(item)
    meta["prompt"] = prompt.text()
    return meta


def relative_position(a: dict, b: dict) -> set[str]:
    """GenEval's ``relative_position`` of object ``a`` to ``b``, their boxes being grid cells."""
    box = lambda o: np.array([[o["col"], o["row"]], [o["col"] + 1, o["row"] + 1]], dtype=np.float64)  # noqa: E731
    boxes = np.stack([box(a), box(b)])  # (2, 2 corners, xy)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {
        name
        for name, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
        if hit
    }


def geneval_correct(content: dict, meta: dict) -> bool:
    """GenEval's ``evaluate`` on judged ``content``: objects ordered by the judge's confidence
    (``score``; row-major where absent), ``include`` clauses with AND, ``exclude`` with OR."""
    detected: dict[str, list[dict]] = {}
    for o in sorted(content["objects"], key=lambda o: -o.get("score", 1.0)):
        detected.setdefault(str(o["digit"]), []).append(o)
    correct, groups = True, []
    for req in meta.get("include", []):
        found = detected.get(req["class"], [])[: req["count"]]
        matched = len(found) >= req["count"]
        if matched and "color" in req:
            matched = sum(o["color"] == req["color"] for o in found) >= req["count"]
        if matched and "position" in req:
            relation, target = req["position"]
            matched = groups[target] is not None and all(
                relation in relative_position(o, t) for o in found for t in groups[target]
            )
        groups.append(found if matched else None)
        correct = correct and matched
    for req in meta.get("exclude", []):
        if len(detected.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def reward(content: dict, prompt: Prompt) -> float:
    """The rule-based reward of one judged image for its prompt: 1.0 when GenEval's rule passes
    it, else 0.0 -- the same rule as ``geneval_*`` (post-training optimises what eval scores)."""
    return float(geneval_correct(content, metadata(prompt)))


def prompt_space(category: str, palette: list[str], grid: int = 2) -> list[Prompt]:
    """Every prompt of ``category`` the MNIST-scene templates can ask for."""
    from itertools import permutations

    pairs = list(permutations(range(10), 2))
    match category:
        case "single_object":
            return [Prompt(category, (d,)) for d in range(10)]
        case "two_objects":
            return [Prompt(category, p) for p in pairs]
        case "counting":
            return [Prompt(category, (d,) * n) for d in range(10) for n in range(2, min(4, grid * grid) + 1)]
        case "colors":
            return [Prompt(category, (d,), (c,)) for d in range(10) for c in palette]
        case "position":
            return [Prompt(category, p, (), r) for p in pairs for r in RELATIONS]
        case "color_attr":
            return [Prompt(category, p, cs) for p in pairs for cs in permutations(palette, 2)]
    raise ValueError(f"unknown category {category!r}")


def held_out(palette: list[str], grid: int, fraction: float) -> set[str]:
    """The prompt texts post-training never sees: ``fraction`` of each category's combinations
    (at least one while ``fraction`` > 0), chosen by a hash of their text -- fixed whatever the
    seed, the same for ``align`` and for evaluation's seen / held-out split."""
    import hashlib

    out: set[str] = set()
    for category in CATEGORIES:
        space = sorted(p.text() for p in prompt_space(category, palette, grid))
        k = max(1, round(fraction * len(space))) if fraction > 0 else 0
        out |= set(sorted(space, key=lambda t: hashlib.sha256(t.encode()).hexdigest())[:k])
    return out


def _factors(prompt: Prompt) -> list[tuple]:
    """What "even coverage" counts: each asked digit, colour, relation and count, by slot."""
    out: list[tuple] = [("digit", k, d) for k, d in enumerate(prompt.digits[:2])]
    out += [("colour", k, c) for k, c in enumerate(prompt.colors)]
    if prompt.relation:
        out.append(("relation", prompt.relation))
    if prompt.category == "counting":
        out.append(("count", len(prompt.digits)))
    return out


def balanced_prompts(per_category: int, palette: list[str], seed: int, grid: int = 2) -> list[Prompt]:
    """``per_category`` prompts of each category covering its digits, colours, relations and
    counts evenly, drawn independently of any data split. Greedy design: each pick is the prompt
    (fewest repeats first) whose factors have been used least so far, ties broken by a seeded
    shuffle, so every digit / colour / relation appears per slot within one of the others."""
    rng = np.random.default_rng(seed)
    out: list[Prompt] = []
    for category in CATEGORIES:
        space = prompt_space(category, palette, grid)
        order = rng.permutation(len(space))
        used: dict[tuple, int] = {}
        picks: dict[int, int] = {}
        for _ in range(per_category):
            best = min(
                order,
                key=lambda i: (picks.get(int(i), 0), sum(used.get(f, 0) for f in _factors(space[i]))),
            )
            picks[int(best)] = picks.get(int(best), 0) + 1
            for f in _factors(space[best]):
                used[f] = used.get(f, 0) + 1
            out.append(space[best])
    return out


def prompts_from_records(records: list[dict], per_category: int, seed: int) -> list[Prompt]:
    """Distinct test-scene captions, ``per_category`` from each category, in a seeded order."""
    rng = np.random.default_rng(seed)
    out = []
    for category in CATEGORIES:
        captions = sorted({r["caption"] for r in records if (r.get("content") or {}).get("category") == category})
        picked = [captions[i] for i in rng.permutation(len(captions))[:per_category]]
        out += [parse_caption(c) for c in picked]
    return out


def read_prompt_file(path: Path, palette: dict | None = None) -> list[Prompt]:
    """Prompts from a GenEval-format ``evaluation_metadata.jsonl`` (one JSON object a line)."""
    prompts = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, tag = row["prompt"], row["tag"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BadInput(f"{path}:{lineno}: expected GenEval metadata with 'tag' and 'prompt'") from None
        prompt = parse_caption(text, palette)
        if prompt is None:
            raise BadInput(f"{path}:{lineno}: prompt {text!r} fits no MNIST-scene template")
        if CATEGORY_OF_TAG.get(tag) != prompt.category:
            raise BadInput(f"{path}:{lineno}: tag {tag!r} does not match prompt {text!r} ({TAGS[prompt.category]})")
        prompts.append(prompt)
    if not prompts:
        raise BadInput(f"{path}: no prompts")
    return prompts


def write_layout(root: Path, prompts: list[Prompt], images: list[np.ndarray]) -> None:
    """GenEval's folder layout; ``images[i]`` is (n, H, W, 3) uint8 for ``prompts[i]``."""
    from PIL import Image

    from transfusion.io import atomic_dir

    with atomic_dir(Path(root)) as tmp:
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            folder = tmp / f"{i:05d}"
            (folder / "samples").mkdir(parents=True)
            (folder / "metadata.jsonl").write_text(json.dumps(metadata(prompt)) + "\n")
            for k, img in enumerate(imgs):
                Image.fromarray(img).save(folder / "samples" / f"{k:04d}.png")


def mean_and_se(per_prompt: list[list[float]]) -> tuple[float, float]:
    """Mean over all images and its standard error, clustered by prompt: the images of one
    prompt are not independent draws, so the error is that of the prompts' means (each prompt
    has the same number of images). One prompt, or one image in all: binomial."""
    means = np.array([np.mean(v) for v in per_prompt], dtype=np.float64)
    n_images = sum(len(v) for v in per_prompt)
    mean = float(np.mean(np.concatenate([np.asarray(v, np.float64) for v in per_prompt])))
    if len(means) < 2:
        return mean, float(np.sqrt(mean * (1 - mean) / max(n_images, 1)))
    return mean, float(means.std(ddof=1) / np.sqrt(len(means)))


def score(read: list[list[dict]], prompts: list[Prompt]) -> dict[str, float]:
    """Per-category accuracy and the overall mean of categories by both rules (``geneval_*``:
    GenEval's; ``scene_match_*``: the exact scene), each with its standard error (``*_se``,
    clustered by prompt; the overall's from the categories' as independent samples), and the
    share of images in which the judge finds no object at all (``blank_rate``, per category and
    overall); ``read[i]`` holds the judged content of prompt i's images."""
    rules = {
        "geneval": lambda c, p, meta: reward(c, p),
        "scene_match": lambda c, p, meta: satisfies(c, p),
        "blank_rate": lambda c, p, meta: not c["objects"],
    }
    out: dict[str, float] = {}
    for name, rule in rules.items():
        by_category: dict[str, list[list[float]]] = {}
        for prompt, contents in zip(prompts, read):
            meta = metadata(prompt)
            by_category.setdefault(prompt.category, []).append([float(rule(c, prompt, meta)) for c in contents])
        for c, per_prompt in by_category.items():
            out[f"{name}_{c}"], out[f"{name}_{c}_se"] = mean_and_se(per_prompt)
        key = name if name == "blank_rate" else f"{name}_overall"
        out[key] = float(np.mean([out[f"{name}_{c}"] for c in by_category]))
        out[f"{key}_se"] = float(np.sqrt(sum(out[f"{name}_{c}_se"] ** 2 for c in by_category)) / len(by_category))
    return out


__all__ = [
    "RELATIONS",
    "TAGS",
    "balanced_prompts",
    "mean_and_se",
    "prompt_space",
    "geneval_correct",
    "metadata",
    "prompts_from_records",
    "read_prompt_file",
    "relative_position",
    "reward",
    "score",
    "write_layout",
]


def split_scores(read: list[dict], prompts: list[Prompt], k: int, hidden: set[str]) -> dict[str, float]:
    """GenEval-style scores (``geneval_*``) of ``k`` judged images per prompt (in prompt order)
    on all ``prompts``, and on the seen (``seen_geneval_*``) and held-out (``held_out_geneval_*``,
    texts in ``hidden``) ones apart."""

    def geneval_of(idx: list[int]) -> dict[str, float]:
        got = score([read[i * k : (i + 1) * k] for i in idx], [prompts[i] for i in idx])
        return {key: v for key, v in got.items() if key.startswith("geneval_")}

    out = geneval_of(list(range(len(prompts))))
    for name, inside in (("seen", False), ("held_out", True)):
        idx = [i for i, p in enumerate(prompts) if (p.text() in hidden) == inside]
        if idx:
            out |= {f"{name}_{key}": v for key, v in geneval_of(idx).items()}
    return out
