"""The layout of a packed Transfusion batch, shared by the data (which builds it) and the model
(which reads it): modality codes, special token ids, and :class:`Batch`. See
``transfusion.data.collate`` for how examples are laid out in a row."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

TEXT, PATCH, TIME, PAD = 0, 1, 2, -1  # modality codes


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        boi, eoi = tok.convert_tokens_to_ids(["<boi>", "<eoi>"])
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return cls(bos=bos, eos=tok.eos_token_id, pad=tok.pad_token_id, boi=boi, eoi=eoi)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long; image slots hold the pad id
    labels: torch.Tensor  # (B, L) long; next text token or -100
    position_ids: torch.Tensor  # (B, L) long; restart per example
    modality: torch.Tensor  # (B, L) long; TEXT, PATCH, TIME or PAD
    image_block: torch.Tensor  # (B, L) long; image index for PATCH/TIME tokens, else -1
    patch_index: torch.Tensor  # (B, L) long; patch number for PATCH tokens, else -1
    document: torch.Tensor  # (B, L) long; example number within the row
    valid: torch.Tensor  # (B, L) bool; False on padding
    images: torch.Tensor  # (N, C, H, W) clean scaled latents, in order of appearance
    image_first: torch.Tensor  # (N,) bool; image precedes any text of its example
    caption_dropped: torch.Tensor  # (N,) bool; its caption was dropped (CFG training)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
