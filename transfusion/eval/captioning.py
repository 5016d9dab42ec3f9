"""Captioning accuracy: generated captions of real test scenes, parsed back and checked.

``exact``: the caption parses and describes the scene exactly (every digit, colours and relation
as stated: ``scenes.satisfies``). Per attribute, over the scenes where it applies: ``digit``
(the mentioned digits are the scene's), ``count`` (as many objects as the scene holds),
``colour`` (each mentioned colour is right; scenes of the colour categories), ``position``
(the relation holds; position scenes).

Captions of data without scene content (a caption folder) are compared as text:
:func:`text_caption_scores` (exact match after normalising case and spaces, and token F1).
"""

from __future__ import annotations

import numpy as np

from transfusion.data.scenes import parse_caption, satisfies


def caption_scores(records: list[dict], captions: list[str], palette: dict | None = None) -> dict[str, float]:
    parts: dict[str, list[bool]] = {k: [] for k in ("exact", "parsed", "digit", "count", "colour", "position")}
    for record, text in zip(records, captions):
        content = record["content"]
        truth = sorted(o["digit"] for o in content["objects"])
        prompt = parse_caption(text, palette)
        parts["parsed"].append(prompt is not None)
        parts["exact"].append(prompt is not None and satisfies(content, prompt))
        said = sorted(prompt.digits) if prompt else []
        parts["digit"].append(sorted(set(said)) == sorted(set(truth)))
        parts["count"].append(len(said) == len(truth))
        if content["category"] in ("colors", "color_attr"):
            ok = bool(prompt and prompt.colors) and sorted(zip(prompt.digits, prompt.colors)) == sorted(
                (o["digit"], o["color"]) for o in content["objects"]
            )
            parts["colour"].append(ok)
        if content["category"] == "position":
            ok = bool(prompt and prompt.relation) and satisfies(content, prompt)
            parts["position"].append(ok)
    return {f"caption_{k}": float(np.mean(v)) for k, v in parts.items() if v}


def text_caption_scores(truths: list[str], captions: list[str]) -> dict[str, float]:
    """``caption_text_exact`` (equal after lower-casing and collapsing spaces) and
    ``caption_token_f1`` (mean F1 of the word multisets), for captions without scene content."""
    from collections import Counter

    exact, f1 = [], []
    for truth, text in zip(truths, captions):
        a, b = truth.lower().split(), text.lower().split()
        exact.append(a == b)
        common = sum((Counter(a) & Counter(b)).values())
        f1.append(0.0 if common == 0 else 2 * common / (len(a) + len(b)))
    return {"caption_text_exact": float(np.mean(exact)), "caption_token_f1": float(np.mean(f1))}
