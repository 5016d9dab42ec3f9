"""GenEval-style compositional score on MNIST scenes, and GenEval's file formats.

Prompts come from test-scene captions, ``prompts_per_category`` for each of GenEval's six
categories (or from a GenEval ``evaluation_metadata.jsonl``). Each generated image is correct
when the judge reads exactly what its prompt asks (``scenes.satisfies``); the overall score is
the mean of the six category accuracies (GenEval's rule). Images are written in GenEval's layout
so its own scorer can run on them::

    <root>/00000/metadata.jsonl        one line: the prompt's metadata
    <root>/00000/samples/0000.png ...  the images for that prompt
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transfusion.config import CATEGORIES
from transfusion.data.scenes import RELATIONS, Prompt, parse_caption, satisfies

# our category names -> GenEval's tags
TAGS = {"single_object": "single_object", "two_objects": "two_object", "counting": "counting",
        "colors": "colors", "position": "position", "color_attr": "color_attr"}
CATEGORY_OF_TAG = {v: k for k, v in TAGS.items()}


def metadata(prompt: Prompt) -> dict:
    """GenEval's metadata for one prompt: tag, include (class, count, color, position), prompt."""
    include = []
    if prompt.category == "counting":
        include.append({"class": str(prompt.digits[0]), "count": len(prompt.digits)})
    else:
        for k, digit in enumerate(prompt.digits):
            item: dict = {"class": str(digit), "count": 1}
            if prompt.colors:
                item["color"] = prompt.colors[k]
            include.append(item)
        if prompt.relation is not None:  # GenEval: the second object is "<relation> the first"
            inverse = {"left_of": "right of", "right_of": "left of", "above": "below", "below": "above"}
            include[1]["position"] = [inverse[prompt.relation], 0]
    return {"tag": TAGS[prompt.category], "include": include, "prompt": prompt.caption()}


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
            raise ValueError(f"{path}:{lineno}: expected GenEval metadata with 'tag' and 'prompt'") from None
        prompt = parse_caption(text, palette)
        if prompt is None:
            raise ValueError(f"{path}:{lineno}: prompt {text!r} fits no MNIST-scene template")
        if CATEGORY_OF_TAG.get(tag) != prompt.category:
            raise ValueError(f"{path}:{lineno}: tag {tag!r} does not match prompt {text!r} ({TAGS[prompt.category]})")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
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


def score(read: list[list[dict]], prompts: list[Prompt]) -> dict[str, float]:
    """Per-category accuracy and the overall mean of categories; ``read[i]`` holds the judged
    content of prompt i's images."""
    by_category: dict[str, list[bool]] = {}
    for prompt, contents in zip(prompts, read):
        by_category.setdefault(prompt.category, []).extend(satisfies(c, prompt) for c in contents)
    out = {f"geneval_{c}": float(np.mean(v)) for c, v in by_category.items()}
    out["geneval_overall"] = float(np.mean([out[f"geneval_{c}"] for c in by_category]))
    return out


__all__ = ["RELATIONS", "TAGS", "metadata", "prompts_from_records", "read_prompt_file", "score", "write_layout"]
