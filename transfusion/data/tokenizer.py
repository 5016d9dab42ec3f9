"""Byte-level BPE tokenizer with the Transfusion special tokens, saved for transformers.

Special tokens: ``<bos> <eos> <pad>`` and ``<boi> <eoi>`` (begin / end of image). The saved
folder loads with ``transformers.PreTrainedTokenizerFast.from_pretrained`` (and AutoTokenizer).
A pretrained tokenizer folder (e.g. a local LLaMA-2 checkpoint) can be used instead; it gains
``<boi>``/``<eoi>`` (and ``<pad>`` when it has none).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transfusion.config import SPECIAL_TOKENS, TokenizerConfig
from transfusion.errors import MissingInput

BOI, EOI = "<boi>", "<eoi>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens=[BOI, EOI],
        clean_up_tokenization_spaces=False,
    )


def with_image_tokens(tokenizer):
    """Add ``<boi>``/``<eoi>`` (and a pad token if missing) to a pretrained tokenizer."""
    missing = [t for t in (BOI, EOI) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]):
    """The tokenizer the params ask for: trained from ``texts`` or loaded from a local folder."""
    if cfg.pretrained is not None:
        return with_image_tokens(load_tokenizer(Path(cfg.pretrained)))
    return train_bpe(texts, cfg.vocab_size, cfg.min_frequency)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise MissingInput(f"{path}: no tokenizer folder here")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def image_token_ids(tokenizer) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids(BOI), tokenizer.convert_tokens_to_ids(EOI)
