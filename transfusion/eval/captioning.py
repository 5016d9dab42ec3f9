"""Captioning accuracy: generated captions of real test scenes, parsed back and checked.

``exact``: the caption parses and describes the scene exactly (every digit, colours and relation
as stated: ``scenes.satisfies``). Per attribute, over the scenes where it applies: ``digit``
(the mentioned digits are the scene's), ``count`` (as many objects as the scene holds),
``colour`` (each mentioned colour is right; scenes of the colour categories), ``position``
(the relation holds; position scenes).
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
