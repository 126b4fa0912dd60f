"""Byte-level BPE: lossless on any text; the stream decoder never splits a character."""

from __future__ import annotations

import pytest

from shiftable_lib.tokenizer import StreamDecoder, encode

TEXTS = [
    "plain ASCII, with punctuation: (a, b) -> [c]!",
    "héllo wörld — ünïcode ✓",
    "emoji 🚀😀👍🏽 and family 👨‍👩‍👧 and flags 🇫🇷",
    "日本語のテキストと中文",
    "  leading spaces\n\ttabs\r\nwindows newline  ",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    assert tokenizer.decode(encode(tokenizer, text)) == text


def test_tokenizer_has_no_unknown_token(tokenizer):
    assert tokenizer.get_vocab().get("<unk>") is None
    assert all(i is not None for i in encode(tokenizer, "\x00\x7f\ufffd 𝔘"))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_detokenization_concatenates_to_the_full_decode(tokenizer, text):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in encode(tokenizer, text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces), "half a character was emitted"


def test_multi_byte_characters_are_held_back_until_complete(tokenizer):
    ids = encode(tokenizer, "🚀")
    assert len(ids) > 1, "the test needs an emoji split over several byte tokens"
    decoder = StreamDecoder(tokenizer)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🚀"
