"""An endless stream of training examples mixed by the ``mixture`` params.

Each draw picks a kind with probability proportional to its weight: a text-only chunk of the
tokenized corpus, a caption->image pair or an image->caption pair (both from the latent shards).
With ``recaption`` > 0 a caption->image pair's caption is, at that rate, one drawn from every
template caption true of its scene (``scenes.true_captions``): its relation and colours, which
its own category's caption leaves unsaid. Data-parallel workers pass their ``rank`` /
``world_size`` so each reads its own rows and its own text offsets. ``state()``/``load_state()``
make the position resumable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from transfusion.config import MixtureConfig
from transfusion.data.collate import Example, caption_to_image, image_to_caption, text_example
from transfusion.data.latents import LatentReader
from transfusion.data.scenes import true_captions

KINDS = ("text", "caption_to_image", "image_to_caption")


class ExampleStream:
    def __init__(
        self,
        latents_root: Path,
        text_ids: np.ndarray,
        tokenizer,
        mixture: MixtureConfig,
        chunk_length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ) -> None:
        self.tokenizer = tokenizer
        weights = np.array([getattr(mixture, k) for k in KINDS], dtype=np.float64)
        if len(text_ids) <= chunk_length:
            weights[0] = 0.0
        self.p = weights / weights.sum()
        self.text_ids, self.chunk, self.recaption = text_ids, chunk_length, mixture.recaption
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.reader = (
            LatentReader(latents_root, split, rank, world_size, shuffle=True, seed=seed, repeat=True)
            if self.p[1:].sum() > 0
            else None
        )
        self.drawn = 0
        self._rows: Iterator | None = None

    def state(self) -> dict:
        return {"drawn": self.drawn}

    def load_state(self, state: dict) -> None:
        """Fast-forward to ``state['drawn']`` examples (replays the draws, skips the work)."""
        target = int(state["drawn"])
        self.drawn, self._rows = 0, None
        for _ in range(target):
            self._draw(materialise=False)

    def take(self, n: int) -> list[Example]:
        return [self._draw() for _ in range(n)]

    def _draw(self, materialise: bool = True) -> Example | None:
        rng = np.random.default_rng([self.seed, self.rank, self.drawn])
        self.drawn += 1
        kind = KINDS[rng.choice(3, p=self.p)]
        if kind == "text":
            start = int(rng.integers(0, len(self.text_ids) - self.chunk))
            return text_example(self.text_ids[start : start + self.chunk].tolist()) if materialise else None
        if self._rows is None:
            self._rows = iter(self.reader)  # type: ignore[arg-type]
        latent, record = next(self._rows)
        if not materialise:
            return None
        text = self._recaptioned(record, rng) if kind == "caption_to_image" else record["caption"]
        caption = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        latent = torch.as_tensor(latent)
        return caption_to_image(caption, latent) if kind == "caption_to_image" else image_to_caption(latent, caption)

    def _recaptioned(self, record: dict, rng: np.random.Generator) -> str:
        """The record's caption, or at rate ``recaption`` any template caption true of its scene."""
        if self.recaption > 0 and record.get("content") and rng.random() < self.recaption:
            options = true_captions(record["content"])
            return options[int(rng.integers(len(options)))]
        return record["caption"]


def tokenize_corpus(tokenizer, text: str, block: int = 1 << 16) -> np.ndarray:
    """The whole text as one int32 id array (tokenized in blocks of lines)."""
    lines = text.splitlines(keepends=True)
    out, buf, size = [], [], 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= block:
            out.extend(tokenizer("".join(buf), add_special_tokens=False)["input_ids"])
            buf, size = [], 0
    if buf:
        out.extend(tokenizer("".join(buf), add_special_tokens=False)["input_ids"])
    return np.asarray(out, dtype=np.int32)
