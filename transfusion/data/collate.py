"""Packed Transfusion batches from text-only, caption->image and image->caption examples.

An :class:`Example` is a list of parts, text token ids or one image latent (C, H, W) each, so an
example may hold several images. Every image becomes ``<boi>`` [time token] P patch slots
``<eoi>``; every example is wrapped in ``<bos> ... <eos>``. Examples are packed greedily into rows
of at most ``max_length`` tokens; packed examples never attend to each other (``document``),
and position ids restart at each example.

Example: ``caption_to_image([11, 12], z)`` then ``image_to_caption(z2, [13])``, 4 patches per
image, time embedding added to the patches (no time token), packed into one row::

    pos        0    1   2    3   4  5  6  7    8     9    0    1   2  3  4  5    6    7     8
    input_ids  bos  11  12  boi  .  .  .  .   eoi   eos  bos  boi  .  .  .  .   eoi  13   eos
    modality   T    T   T    T   P  P  P  P    T     T    T    T   P  P  P  P    T    T    T
    image_block -1  -1  -1  -1   0  0  0  0   -1    -1   -1   -1   1  1  1  1   -1   -1   -1
    patch_index -1  -1  -1  -1   0  1  2  3   -1    -1   -1   -1   0  1  2  3   -1   -1   -1
    document    0   0   0    0   0  0  0  0    0     0    1    1   1  1  1  1    1    1    1
    labels      11  12  boi  .   .  .  .  eoi eos    .    boi  .   .  .  .  eoi  13   eos   .

(``.`` in input_ids is the pad id in an image slot; ``.`` in labels is -100: no LM loss.) The
label at position i is the next token when that token is text, so ``<boi>`` and ``<eoi>`` are
predicted too; patches are the diffusion loss's business. ``images[1]`` precedes its caption,
so ``image_first[1]`` is True and its noise is capped. With ``caption_dropout`` a caption that
precedes its image is removed (``caption_dropped``) to train classifier-free guidance; such an
image is not image-first (``<bos> <boi>`` is the unconditional branch that sampling runs from
pure noise, so it must see the whole noise range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfusion.errors import BadInput
from transfusion.layout import PAD, PATCH, TEXT, TIME, Batch, SpecialIds

Part = list[int] | torch.Tensor


@dataclass
class Example:
    parts: list[Part]  # token id lists and (C, H, W) latents, in sequence order


def text_example(ids: list[int]) -> Example:
    return Example([list(ids)])


def caption_to_image(caption: list[int], latent: torch.Tensor) -> Example:
    return Example([list(caption), latent])


def image_to_caption(latent: torch.Tensor, caption: list[int]) -> Example:
    return Example([latent, list(caption)])


class Collator:
    """Turns a list of :class:`Example` into one packed :class:`Batch`."""

    def __init__(
        self,
        special: SpecialIds,
        patches_per_image: int,
        max_length: int,
        time_token: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        pack: bool = True,
    ) -> None:
        self.special, self.patches, self.max_length = special, patches_per_image, max_length
        self.pack = pack  # False: one example per row (sampling)
        self.time_token, self.caption_dropout = time_token, caption_dropout
        self.generator = torch.Generator().manual_seed(seed)

    def state(self) -> str:
        """The caption-dropout RNG's state (base64), for checkpoints: a resumed run drops the
        same captions as the uninterrupted one."""
        import base64

        return base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")

    def load_state(self, state: str) -> None:
        import base64

        import numpy as np

        raw = np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()
        self.generator.set_state(torch.from_numpy(raw))

    # -- one example -> token rows ---------------------------------------------------------
    def _segment(self, example: Example) -> tuple[dict[str, list], list[torch.Tensor], list[bool], list[bool]]:
        s = self.special
        parts = list(example.parts)
        dropped = False
        if len(parts) >= 2 and isinstance(parts[0], list) and torch.is_tensor(parts[1]) and self.caption_dropout > 0:
            if torch.rand((), generator=self.generator).item() < self.caption_dropout:
                parts[0], dropped = [], True
        seg: dict[str, list] = {"ids": [s.bos], "mod": [TEXT], "img": [-1], "patch": [-1]}
        images, image_first, drops = [], [], []
        seen_text = False

        def add(ids, mod, img, patch):
            seg["ids"] += ids
            seg["mod"] += mod
            seg["img"] += img
            seg["patch"] += patch

        for part in parts:
            if torch.is_tensor(part):
                k = len(images)  # local image number, made global in __call__
                images.append(part)
                # a dropped caption makes the image unconditional, not image-first: it keeps the
                # full noise range that CFG sampling starts from
                image_first.append(not seen_text and not dropped)
                drops.append(dropped)
                add([s.boi], [TEXT], [-1], [-1])
                if self.time_token:
                    add([s.pad], [TIME], [k], [-1])
                add([s.pad] * self.patches, [PATCH] * self.patches, [k] * self.patches, list(range(self.patches)))
                add([s.eoi], [TEXT], [-1], [-1])
            else:
                seen_text = seen_text or len(part) > 0
                add(list(part), [TEXT] * len(part), [-1] * len(part), [-1] * len(part))
        add([s.eos], [TEXT], [-1], [-1])
        if len(seg["ids"]) > self.max_length:
            if images:
                raise BadInput(f"an example with images needs {len(seg['ids'])} tokens > max_length {self.max_length}")
            seg = {k: v[: self.max_length] for k, v in seg.items()}  # text: truncate
        return seg, images, image_first, drops

    # -- examples -> packed batch ----------------------------------------------------------
    def __call__(self, examples: list[Example]) -> Batch:
        return self._batch(self._pack([self._segment(ex) for ex in examples]))

    def _pack(self, segments: list[tuple]) -> list[list[tuple]]:
        """Segments into rows of at most ``max_length`` tokens, greedily in order (one per row
        without packing)."""
        rows: list[list[tuple]] = [[]]
        used = 0
        for seg in segments:
            n = len(seg[0]["ids"])
            if (not self.pack or used + n > self.max_length) and rows[-1]:
                rows.append([])
                used = 0
            rows[-1].append(seg)
            used += n
        return rows

    def _batch(self, rows: list[list[tuple]]) -> Batch:
        """The :class:`Batch` of packed rows, with next-text-token labels."""
        B, L = len(rows), max(sum(len(seg["ids"]) for seg, *_ in row) for row in rows)
        fill = {"input_ids": self.special.pad, "modality": PAD, "image_block": -1, "patch_index": -1, "document": -1}
        t = {name: torch.full((B, L), value, dtype=torch.long) for name, value in fill.items()}  # (B, L) each
        t["position_ids"] = torch.zeros((B, L), dtype=torch.long)
        images, image_first, drops = [], [], []
        for b, row in enumerate(rows):
            at = 0
            for d, (seg, imgs, first, dropped) in enumerate(row):
                n = len(seg["ids"])
                sl = slice(at, at + n)
                t["input_ids"][b, sl] = torch.tensor(seg["ids"])
                t["modality"][b, sl] = torch.tensor(seg["mod"])
                local = torch.tensor(seg["img"])
                t["image_block"][b, sl] = torch.where(local >= 0, local + len(images), local)
                t["patch_index"][b, sl] = torch.tensor(seg["patch"])
                t["document"][b, sl] = d
                t["position_ids"][b, sl] = torch.arange(n)
                images += imgs
                image_first += first
                drops += dropped
                at += n
        modality, document, input_ids = t["modality"], t["document"], t["input_ids"]
        labels = torch.full((B, L), -100, dtype=torch.long)
        nxt_text = (modality[:, 1:] == TEXT) & (document[:, 1:] == document[:, :-1])
        labels[:, :-1] = torch.where(nxt_text, input_ids[:, 1:], labels[:, :-1])
        return Batch(
            **t,
            labels=labels,
            valid=modality != PAD,
            images=torch.stack(images) if images else torch.zeros(0),
            image_first=torch.tensor(image_first, dtype=torch.bool),
            caption_dropped=torch.tensor(drops, dtype=torch.bool),
        )
