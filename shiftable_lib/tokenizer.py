"""Byte-level BPE (HF `tokenizers`) and a streaming detokenizer that emits only whole characters."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`. Every byte is in the alphabet, so nothing is unknown."""
    tok = Tokenizer(models.BPE())
    # no normaliser: case, whitespace and punctuation are kept exactly
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOS)


def stop_ids(tok: Tokenizer, stop_tokens: Iterable[str] = ()) -> set[int]:
    """The ids of the tokens that end a generation: `stop_tokens` (a version's own, such as
    an instruct model's `<|im_end|>`), else our EOS."""
    ids = {i for t in stop_tokens if (i := tok.token_to_id(t)) is not None}
    return ids or {eos_id(tok)}


def separator_id(tok: Tokenizer, stop_tokens: Iterable[str] = ()) -> int:
    """The token between documents (in training text, and before an empty prompt): our EOS
    where the vocabulary has it (pretrained byte-level vocabularies mostly do), else the first
    of the version's stop tokens."""
    found = eos_id(tok)
    if found is None:
        for token in stop_tokens:
            if (found := tok.token_to_id(token)) is not None:
                break
    if found is None:
        raise ValueError(f"the vocabulary has no {EOS} and no stop token to separate documents")
    return found


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def encode_apart(tok: Tokenizer, text: str) -> list[int]:
    """`encode`, for another thread: `encode_batch` lets go of the GIL while it works (`encode`
    holds it), so the thread that called it is not the only one that runs."""
    return tok.encode_batch([text], add_special_tokens=False)[0].ids


def encode_documents(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    A byte-level token can end in the middle of a multi-byte character; decoding then yields
    U+FFFD. We hold such tokens back until the character completes. Only a short window of
    tokens is re-decoded each step, so the cost per token is constant.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: tokens before it are settled
        self.read_offset = 0  # tokens before it have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: printable Latin-1 bytes as
    themselves, the rest as the characters from U+0100 on, in byte order. Character -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [0x100 + i for i in range(len(others))]
    return {chr(c): b for b, c in zip(printable + others, chars, strict=True)}


class Vocabulary:
    """Every token's exact bytes and a readable text, for reporting tokens one by one (log-
    probabilities, /tokenize): a byte-level token may hold part of a UTF-8 character, whose
    bytes its text writes as \\xNN escapes so that no two tokens read the same."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        alphabet = _byte_alphabet()
        special = {t.content for t in tok.get_added_tokens_decoder().values()}
        table = []
        for i in range(tok.get_vocab_size()):
            piece = tok.id_to_token(i) or ""
            if piece not in special and piece and all(c in alphabet for c in piece):
                table.append(bytes(alphabet[c] for c in piece))
            elif piece in special:
                table.append(piece.encode())
            else:
                table.append(tok.decode([i], skip_special_tokens=False).encode())
        self.bytes = table
        self.texts = [b.decode("utf-8", "backslashreplace") for b in table]

    def __len__(self) -> int:
        return len(self.bytes)

    def check(self, ids: Iterable[int]) -> list[int]:
        """`ids` as a list, or ValueError naming the first id that is not a token here."""
        out = list(ids)
        for i in out:
            if not 0 <= i < len(self.bytes):
                raise ValueError(f"token id {i} is not in the vocabulary (0 to {len(self) - 1})")
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(self.check(ids), skip_special_tokens=False)
