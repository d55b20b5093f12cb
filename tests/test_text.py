"""Captions, Wan text cleaning, the offline word tokenizer and the zero-padded UMT5 encoder (tiny preset)."""

import pytest
import torch
from transformers import AutoTokenizer

from shotstream.presets import TINY
from shotstream.text import (
    TextEncoder,
    build_text_encoder,
    build_word_tokenizer,
    clean_text,
    shot_caption,
    story_captions,
)

CONFIG = TINY.text_encoder
WORDS = ["a", "red", "cat", "sits", "on", "the", "mat", ".", "camera", "cuts", "to", "blue", "dog"]
VOCABULARY = [*WORDS, "running", "shot0", "shot1", "shot2", ":", "The", "cat"]  # case, duplicates folded


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(VOCABULARY, CONFIG.max_length)
    return TextEncoder(tokenizer, build_text_encoder(CONFIG, len(tokenizer)), CONFIG.max_length).eval()


def test_captions_are_plain_concatenation():
    assert shot_caption("G.", "S1", 0) == "G.shot0:S1"
    assert story_captions("G.", ["S1", "S2", "S3"]) == ["G.shot0:S1", "G.shot1:S2", "G.shot2:S3"]
    assert story_captions("G", []) == []


def test_clean_text():
    assert clean_text("  a\t\n red   cat  ") == "a red cat"
    assert clean_text("Tom &amp; Jerry") == "Tom & Jerry"
    assert clean_text("Tom &amp;amp; Jerry") == "Tom & Jerry"  # unescaped twice
    assert clean_text("the cat\u2019s hat") == "the cat's hat"  # ftfy: curly quote
    assert clean_text("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy: mojibake


def test_word_tokenizer_round_trip(tmp_path):
    tokenizer = build_word_tokenizer(VOCABULARY, CONFIG.max_length)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert len(tokenizer) == 3 + 18
    assert tokenizer.tokenize("A red cat.shot0:Dog!") == [
        "a",
        "red",
        "cat",
        ".",
        "shot0",
        ":",
        "dog",
        "<unk>",
    ]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The red cat sits, on the mat."
    ids = tokenizer(text, padding="max_length", max_length=12, truncation=True).input_ids
    assert loaded(text, padding="max_length", max_length=12, truncation=True).input_ids == ids
    tokens = ["the", "red", "cat", "sits", "<unk>", "on", "the", "mat", ".", "</s>", "<pad>", "<pad>"]
    assert tokenizer.convert_ids_to_tokens(ids) == tokens  # ',' is not in the vocabulary


def test_encoder_output_is_zero_padded(encoder):
    captions = story_captions("a red cat sits on the mat.", ["the camera cuts to a blue dog", "running"])
    lengths = encoder.count_tokens(captions)
    with torch.no_grad():
        embeds = encoder(captions)
    assert embeds.shape == (2, CONFIG.max_length, CONFIG.d_model)
    for row, length in zip(embeds, lengths, strict=True):
        assert (row[length:] == 0).all()
        assert (row[:length].abs().sum(dim=-1) > 0).all()


def test_truncation_keeps_max_length(encoder):
    long_caption = shot_caption("a red cat sits on the mat.", "the blue dog running " * 20, 0)
    (count,) = encoder.count_tokens([long_caption])
    assert count > CONFIG.max_length
    input_ids, attention_mask = encoder.tokenize([long_caption])
    assert input_ids.shape == (1, CONFIG.max_length) and attention_mask.all()
    assert input_ids[0, -1] == 1  # </s> survives truncation, the tail of the shot caption is cut
    with torch.no_grad():
        assert (encoder([long_caption]).abs().sum(dim=-1) > 0).all()


def test_encoder_is_deterministic_and_batch_independent(encoder):
    captions = story_captions("a red cat.", ["the dog", "the mat", "cuts"])
    with torch.no_grad():
        first, again, alone = encoder(captions), encoder(captions), encoder(captions[:1])
    assert torch.equal(first, again)
    torch.testing.assert_close(alone[0], first[0])
    assert encoder(captions).requires_grad  # no hard-coded no_grad: the encoder can be fine-tuned


def test_save_and_load_round_trip(encoder, tmp_path):
    encoder.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path, max_length=CONFIG.max_length, local_files_only=True)
    captions = ["A  red cat &amp; a blue dog."]
    with torch.no_grad():
        assert torch.equal(loaded(captions), encoder(captions))


def test_missing_files_give_a_clear_error(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        TextEncoder.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        TextEncoder.from_pretrained(tmp_path)
    encoder.save_pretrained(tmp_path)
    (tmp_path / "text_encoder" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(OSError, match="text_encoder"):
        TextEncoder.from_pretrained(tmp_path)
