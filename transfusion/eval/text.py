"""Text benchmark: bits per byte (tokenizer-independent) and perplexity on held-out text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def bits_per_byte(model, ids: list[int], text_bytes: int, chunk: int) -> dict[str, float]:
    """Score ``ids`` (the tokenized text, ``text_bytes`` UTF-8 bytes long) in chunks of ``chunk``
    tokens, each after ``<bos>``; every token is predicted exactly once."""
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        x = torch.tensor([[model.special.bos, *part]], device=device)
        hidden = model.transformer(model.embed_tokens(x), None, None)[:, :-1]  # plain causal mask
        logits = model.text_logits(hidden).float()[0]
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(part)
    return {
        "text_bits_per_byte": nll / math.log(2) / text_bytes,
        "text_perplexity": math.exp(nll / n),
        "text_tokens": n,
        "text_bytes": text_bytes,
    }
