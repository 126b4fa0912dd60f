"""Corpora on disk: `<home>/data/general/*.txt` plus one folder per specialist.

A *document* is a run of text separated from the next by two or more blank lines; one longer
than MAX_DOCUMENT_CHARS (a file with no such break, say) is cut into pieces of about
PIECE_CHARS at paragraph or line breaks, so that any text file splits into enough documents to
hold some out. The held-out split is by document and depends only on each document's bytes, so
it is stable across machines and when documents are added; where the documents it picks hold
too little of the text, the next ones by the same hash join them (`split_heldout`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenizers import Tokenizer

from shiftable_lib.config import Profile
from shiftable_lib.errors import CorpusInvalid, CorpusMissing, CorpusTooSmall, InvalidName
from shiftable_lib.tokenizer import encode_documents

GENERAL = "general"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Documents are separated by two or more blank lines (whitespace-only lines count as blank).
DOCUMENT_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
DOCUMENT_SEPARATOR = "\n\n\n"
HELDOUT_PERMILLE = 100  # 10% of documents, chosen by content hash
# ... holding at least this share of the text, else topped up to HELDOUT_PERMILLE of it
MIN_HELDOUT_SHARE = 0.05
# of the rest, the documents whose hash falls in the next CALIBRATION_PERMILLE are trained on by
# no part of the model: the text a gate is calibrated on (`split_calibration`)
CALIBRATION_PERMILLE = 50
MAX_DOCUMENT_CHARS = 16_384
PIECE_CHARS = 4_096
# a corpus to learn from has this many batches of distinct training tokens, and one window held
# out; beyond COUNTED_CHARS of a split, its tokens are estimated from that much of it
MIN_TRAIN_BATCHES = 2
COUNTED_CHARS = 2_000_000
# an add or a removal reads at most this much of each other domain's training text (and a
# tenth of it held out): what its gate phase and checks use, however large the corpus grows
REPLAY_CHARS = 8_000_000


def validate_specialist_name(name: object) -> str:
    """Return `name` if it can name a specialist folder, else raise InvalidName saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"specialist name must be a string, got {type(name).__name__}")
    if name == GENERAL:
        raise InvalidName("'general' is the generalist's corpus and cannot be a specialist")
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidName(
            f"invalid specialist name {shown!r}: use 1-64 characters, a lowercase letter first, "
            "then lowercase letters, digits, '_' or '-'"
        )
    return name


@dataclass(frozen=True)
class Domain:
    """One domain's text, split into training, held-out and calibration documents."""

    name: str
    train: list[str]
    heldout: list[str]
    whole: bool = True  # False when `sampled` left documents out
    calibration: list[str] = field(default_factory=list)  # from neither split (see load_domain)

    @property
    def n_chars(self) -> int:
        return sum(map(len, (*self.train, *self.heldout, *self.calibration)))


def text_files(folder: Path) -> list[Path]:
    """The non-empty `.txt` files directly inside `folder`, sorted by name. A file that is a
    link to somewhere outside the data folder (`folder`'s parent) is refused (CorpusInvalid):
    nothing from elsewhere on the machine is ever read as a corpus."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.glob("*.txt") if p.is_file() and p.stat().st_size > 0)
    for path in files:
        confined(path, folder.parent)
    return files


def confined(path: Path, root: Path) -> Path:
    """`path`, or CorpusInvalid if it is, or passes through, a link that leads out of `root`."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise CorpusInvalid(
            f"{path} links outside {root}: copy the text into {root} instead of linking to it"
        )
    return path


def discover_specialists(data_dir: Path) -> list[str]:
    """Names of the specialist folders under `data_dir` that hold text, sorted.

    Hidden folders (such as `.deleted`) and folders whose name is not a valid specialist name
    are not specialists.
    """
    if not data_dir.is_dir():
        return []
    names = []
    for child in sorted(data_dir.iterdir()):
        if child.name == GENERAL or not child.is_dir():
            continue
        if NAME_PATTERN.fullmatch(child.name) and text_files(confined(child, data_dir)):
            names.append(child.name)
    return names


def domain_dir(data_dir: Path, name: str) -> Path:
    """The folder of domain `name`, after checking that neither its name nor a link can lead
    out of `data_dir`."""
    if name != GENERAL:
        validate_specialist_name(name)
    return confined(data_dir / name, data_dir)


@dataclass(frozen=True)
class Corpus:
    """A domain's corpus as it was read: its folder, its non-empty .txt files, the documents
    they split into and how much of the text is held out. `tokens` (training split) and
    `heldout_tokens` are counted with a model's tokenizer when one is given (0 without), for
    the first COUNTED_CHARS of each split and in proportion beyond (`estimated`)."""

    name: str
    dir: Path
    files: int
    bytes: int
    documents: int = 0
    heldout_documents: int = 0
    chars: int = 0
    heldout_chars: int = 0
    tokens: int = 0
    heldout_tokens: int = 0
    estimated: bool = False


def require_corpus(data_dir: Path, name: str) -> Path:
    """The folder of domain `name`; CorpusMissing, saying what to create, when it holds no
    non-empty .txt file. Every "no corpus" the stack reports is one of these two messages."""
    folder = domain_dir(data_dir, name)
    if not folder.is_dir():
        raise CorpusMissing(
            f"no corpus folder for {name!r}: create {folder} and put .txt files in it"
        )
    if not text_files(folder):
        raise _no_text(folder)
    return folder


def _no_text(folder: Path) -> CorpusMissing:
    return CorpusMissing(f"{folder} holds no text: add one or more non-empty .txt files")


def check_corpus(
    data_dir: Path, name: str, tok: Tokenizer | None = None, profile: Profile | None = None
) -> Corpus:
    """Domain `name`'s corpus once every file has been read and found usable: CorpusMissing as
    `require_corpus` raises it, CorpusInvalid naming the file (and byte) that is not UTF-8,
    cannot be read or links out of the data folder, and CorpusMissing when there is no text
    but blank lines. With a tokenizer its tokens are counted, and with a profile too a corpus
    too small to train and evaluate that profile's model on is refused (CorpusTooSmall). What
    an add checks before anything is recorded."""
    folder = require_corpus(data_dir, name)
    docs = read_documents(folder)
    if not docs:
        raise _no_text(folder)
    train, heldout, _ = split_domain(docs)
    files = text_files(folder)
    corpus = Corpus(
        name=name,
        dir=folder,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        documents=len(docs),
        heldout_documents=len(heldout),
        chars=sum(map(len, docs)),
        heldout_chars=sum(map(len, heldout)),
    )
    if tok is None:
        return corpus
    (tokens, exact), (heldout_tokens, exact_heldout) = (
        count_tokens(tok, train),
        count_tokens(tok, heldout),
    )
    corpus = replace(
        corpus,
        tokens=tokens,
        heldout_tokens=heldout_tokens,
        estimated=not (exact and exact_heldout),
    )
    if profile is not None:
        require_learnable(corpus, profile)
    return corpus


def count_tokens(tok: Tokenizer, docs: list[str]) -> tuple[int, bool]:
    """Tokens of `docs`, each followed by an end-of-text token, and whether that is a count
    (True) or, for more than COUNTED_CHARS of text, the count of its first COUNTED_CHARS
    scaled to the whole."""
    head, chars = [], 0
    for doc in docs:
        if chars >= COUNTED_CHARS:
            break
        head.append(doc)
        chars += len(doc)
    counted = sum(len(ids) + 1 for ids in encode_documents(tok, head))
    total = sum(map(len, docs))
    if len(head) == len(docs):
        return counted, True
    return round(counted * total / max(1, chars)), False


def min_tokens(profile: Profile) -> tuple[int, int]:
    """The least training and held-out tokens a corpus needs for `profile`'s model."""
    return MIN_TRAIN_BATCHES * profile.batch_size * profile.context, profile.context + 1


def require_learnable(corpus: Corpus, profile: Profile) -> None:
    """CorpusTooSmall, saying how much text it holds and how much it takes, unless `corpus`
    has enough tokens to train on (MIN_TRAIN_BATCHES batches of distinct text) and at least
    one whole window held out to evaluate on."""
    need_train, need_heldout = min_tokens(profile)
    if corpus.tokens >= need_train and corpus.heldout_tokens >= need_heldout:
        return
    raise CorpusTooSmall(
        f"{corpus.dir} holds too little text to learn from: {corpus.tokens:,} tokens to train "
        f"on and {corpus.heldout_tokens:,} held out ({corpus.documents} documents, "
        f"{corpus.bytes:,} bytes); the {profile.name} model needs at least {need_train:,} to "
        f"train on and {need_heldout:,} held out: add more text"
    )


def split_documents(text: str) -> list[str]:
    """The documents of one file's text (see the module's docstring); any line ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    docs = (d.strip() for d in DOCUMENT_BREAK.split(text))
    return [piece for d in docs if d for piece in _pieces(d)]


def _pieces(doc: str) -> list[str]:
    """`doc`, or pieces of about PIECE_CHARS if it is longer than MAX_DOCUMENT_CHARS, each cut
    at the last blank line, else line break, else space in its second half (else anywhere)."""
    if len(doc) <= MAX_DOCUMENT_CHARS:
        return [doc]
    pieces, start = [], 0
    while len(doc) - start > PIECE_CHARS * 3 // 2:
        end = start + PIECE_CHARS
        for sep in ("\n\n", "\n", " "):
            at = doc.rfind(sep, start + PIECE_CHARS // 2, end)
            if at > 0:
                end = at
                break
        pieces.append(doc[start:end].strip())
        start = end
    pieces.append(doc[start:].strip())
    return [p for p in pieces if p]


def _rank(doc: str) -> int:
    return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big")


def _is_heldout(doc: str) -> bool:
    return _rank(doc) % 1000 < HELDOUT_PERMILLE


def split_heldout(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) documents, in their order. Held out: those whose hash picks them
    (HELDOUT_PERMILLE of them), topped up in the order of the same hash to HELDOUT_PERMILLE of
    the text when they hold less than MIN_HELDOUT_SHARE of it; at least one document each
    way. One document alone gives its last tenth, cut at a line break where there is one."""
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
        return [text[:cut]], [text[cut:]]
    order = sorted(range(len(docs)), key=lambda i: _rank(docs[i]) % 1000)
    held = {i for i in order if _is_heldout(docs[i])}
    total, chars = sum(map(len, docs)), sum(len(docs[i]) for i in held)
    if chars < MIN_HELDOUT_SHARE * total or not held:
        for i in order:
            if held and chars >= HELDOUT_PERMILLE / 1000 * total:
                break
            if i not in held:
                held.add(i)
                chars += len(docs[i])
    if len(held) == len(docs):  # one kept for training: the one the hash picks last
        held.discard(order[-1])
    train = [d for i, d in enumerate(docs) if i not in held]
    return train, [d for i, d in enumerate(docs) if i in held]


def split_calibration(train: list[str]) -> tuple[list[str], list[str]]:
    """(train, calibration): of the training documents, those whose hash falls just above the
    held-out ones' (CALIBRATION_PERMILLE of them), when that leaves most of the text to train
    on; else none. A model predicts the text it was trained on better than any other, so what
    changes on it is no guide to what changes on text it has not seen: the held-out split,
    which only measures, and the text users bring."""
    if len(train) < 2:
        return train, []
    band = range(HELDOUT_PERMILLE, HELDOUT_PERMILLE + CALIBRATION_PERMILLE)
    picked = {i for i, d in enumerate(train) if _rank(d) % 1000 in band}
    if not picked or sum(len(train[i]) for i in picked) > 0.1 * sum(map(len, train)):
        return train, []
    return [d for i, d in enumerate(train) if i not in picked], [train[i] for i in sorted(picked)]


def split_domain(docs: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(train, held-out, calibration) documents: what `load_domain` trains and evaluates on,
    and what `check_corpus` reports."""
    train, heldout = split_heldout(docs)
    train, calibration = split_calibration(train)
    return train, heldout, calibration


def read_documents(folder: Path) -> list[str]:
    """All documents of the `.txt` files in `folder`; fail naming any file that is not UTF-8."""
    docs: list[str] = []
    for path in text_files(folder):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusInvalid(
                f"{path} is not valid UTF-8 text (byte {exc.start}): convert it to UTF-8"
            ) from None
        except OSError as exc:
            raise CorpusInvalid(f"cannot read {path}: {exc.strerror}") from None
        docs.extend(split_documents(text))
    return docs


def load_domain(data_dir: Path, name: str) -> Domain:
    """Read domain `name` and split it deterministically into train, held-out and calibration
    documents."""
    folder = require_corpus(data_dir, name)
    docs = read_documents(folder)
    if not docs:  # only blank lines in its files
        raise _no_text(folder)
    train, heldout, calibration = split_domain(docs)
    return Domain(name=name, train=train, heldout=heldout, calibration=calibration)


def corpus_digest(folder: Path) -> str:
    """A digest of a domain folder's text files (names and bytes), to notice changes."""
    h = hashlib.sha256()
    for path in text_files(folder):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def sampled(domain: Domain, max_chars: int = REPLAY_CHARS) -> Domain:
    """`domain` with at most `max_chars` of training text and a tenth of that held out:
    documents evenly spaced through each split, in order (the whole split when it fits)."""
    train, heldout = _spread(domain.train, max_chars), _spread(domain.heldout, max_chars // 10)
    calibration = _spread(domain.calibration, max_chars // 10)
    whole = len(train) == len(domain.train) and len(heldout) == len(domain.heldout)
    return replace(domain, train=train, heldout=heldout, calibration=calibration, whole=whole)


def _spread(docs: list[str], max_chars: int) -> list[str]:
    total = sum(map(len, docs))
    if total <= max_chars:
        return docs
    kept, kept_chars, seen = [], 0, 0
    for doc in docs:  # a document is kept while the sample lags behind its share of the text
        if kept_chars <= seen * max_chars / total:
            kept.append(doc)
            kept_chars += len(doc)
        seen += len(doc)
    return kept
