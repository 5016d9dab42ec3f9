"""The Transfusion attention mask: causal everywhere, bidirectional inside each image.

Per token we know its document (packed examples never see each other), whether it is real or
padding, and its image block (-1 for text; one id per image, never shared by two images). Query
``i`` may attend key ``j`` when both are in the same document, ``j`` is real, and either
``j <= i`` (causal) or ``i`` and ``j`` lie in the same image block (bidirectional within it).
A text token after an image therefore sees all of its patches; a patch never sees later text
or a later image.
"""

from __future__ import annotations

import torch


def hybrid_mask(document: torch.Tensor, image_block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, 1, L, L) bool mask for sdpa (True = may attend)."""
    L = document.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=document.device).tril()  # (L, L)
    same_doc = document[:, :, None] == document[:, None, :]  # (B, L, L)
    same_image = (image_block[:, :, None] == image_block[:, None, :]) & (image_block[:, :, None] >= 0)
    allowed = same_doc & (causal | same_image) & valid[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=document.device)  # padding rows: self only
    return allowed[:, None]


def hybrid_block_mask(document: torch.Tensor, image_block: torch.Tensor, valid: torch.Tensor):
    """The same rule as a FlexAttention ``BlockMask`` (sparse blocks skipped; for CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = document.shape

    def mask_mod(b, h, q, kv):
        same_doc = document[b, q] == document[b, kv]
        same_image = (image_block[b, q] == image_block[b, kv]) & (image_block[b, q] >= 0)
        return (same_doc & ((kv <= q) | same_image) & valid[b, kv]) | (q == kv)

    return create_block_mask(mask_mod, B, None, L, L, device=str(document.device))


def dense_to_block_mask(mask: torch.Tensor):
    """A bool (B, 1, q, K) mask (True = may attend) as a FlexAttention ``BlockMask``: the KV-cached
    sampler builds dense masks over its cache; transformers' flex path would otherwise add a
    tensor mask to the scores as 0/1 instead of masking."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, _, q, K = mask.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, B, None, q, K, device=str(mask.device))
