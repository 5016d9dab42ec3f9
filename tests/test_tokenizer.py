"""Tokenizer: byte-level round trip, special tokens as single ids, transformers loading."""

from __future__ import annotations

import pytest

from conftest import section
from transfusion.config import SPECIAL_TOKENS
from transfusion.data.tokenizer import BOI, EOI, build_tokenizer, image_token_ids, load_tokenizer, train_bpe

CORPUS = ["To be, or not to be, that is the question:", "a red 4", "a 3 and a 7", "three 5s"] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=320)


def test_round_trip_any_text(tokenizer):
    for text in ["To be, or not to be", "Ünïcødé — 東京 🙂", "  spaces\tand\nnewlines  ", "a blue 3 and a yellow 8"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    boi, eoi = image_token_ids(tokenizer)
    encoded = tokenizer(f"a red 4{BOI}{EOI}the end", add_special_tokens=False)["input_ids"]
    assert encoded.count(boi) == 1 and encoded.count(eoi) == 1
    assert encoded.index(eoi) == encoded.index(boi) + 1
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a red 4the end"


def test_save_and_load_with_transformers(tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save_pretrained(str(tmp_path))
    for loaded in (
        PreTrainedTokenizerFast.from_pretrained(str(tmp_path)),
        load_tokenizer(tmp_path),
        AutoTokenizer.from_pretrained(str(tmp_path)),
    ):
        text = f"{BOI}{EOI} Whether 'tis nobler"
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert image_token_ids(loaded) == image_token_ids(tokenizer)
        assert len(loaded) == len(tokenizer)


def test_vocab_size_from_params():
    import random

    rnd = random.Random(0)
    corpus = [" ".join("".join(rnd.choices("abcdefghij", k=rnd.randint(2, 6))) for _ in range(12)) for _ in range(400)]
    for size in (300, 400):
        assert len(build_tokenizer(section("tokenizer", vocab_size=size, min_frequency=1), corpus)) == size


def test_pretrained_folder_gains_image_tokens(tmp_path):
    """A pretrained tokenizer without <boi>/<eoi>/<pad> (as a LLaMA-2 one) gets them added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=280, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>").save_pretrained(str(tmp_path))

    tok = build_tokenizer(section("tokenizer", pretrained=tmp_path), [])
    assert tok.bos_token == "<s>" and tok.pad_token == "<pad>"
    boi, eoi = image_token_ids(tok)
    assert boi >= 280 and eoi >= 280 and boi != eoi
    assert tok.convert_ids_to_tokens([boi, eoi]) == [BOI, EOI]
