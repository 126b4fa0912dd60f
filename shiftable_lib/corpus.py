"""Corpora on disk: `<home>/data/general/*.txt` plus one folder per specialist.

A *document* is a run of text separated from the next by two or more blank lines; a file with
no such break is one document. The held-out split is by document and depends only on each
document's bytes, so it is stable across machines and when documents are added.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from shiftable_lib.errors import CorpusInvalid, CorpusMissing, InvalidName

GENERAL = "general"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Documents are separated by two or more blank lines (whitespace-only lines count as blank).
DOCUMENT_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
DOCUMENT_SEPARATOR = "\n\n\n"
HELDOUT_PERMILLE = 100  # 10% of documents, chosen by content hash


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
    """One domain's text, split into training and held-out documents."""

    name: str
    train: list[str]
    heldout: list[str]

    @property
    def n_chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.heldout))


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
    """A domain's corpus as it lies on disk: its folder, and its non-empty .txt files."""

    name: str
    dir: Path
    files: int
    bytes: int


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


def check_corpus(data_dir: Path, name: str) -> Corpus:
    """Domain `name`'s corpus once every file has been read and found usable: CorpusMissing as
    `require_corpus` raises it, CorpusInvalid naming the file (and byte) that is not UTF-8,
    cannot be read or links out of the data folder, and CorpusMissing when there is no text
    but blank lines. What an add checks before anything is recorded."""
    folder = require_corpus(data_dir, name)
    if not read_documents(folder):
        raise _no_text(folder)
    files = text_files(folder)
    return Corpus(name, folder, len(files), sum(p.stat().st_size for p in files))


def split_documents(text: str) -> list[str]:
    docs = (d.strip() for d in DOCUMENT_BREAK.split(text.replace("\r\n", "\n")))
    return [d for d in docs if d]


def _is_heldout(doc: str) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PERMILLE


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
    """Read domain `name` and split it deterministically into train and held-out documents."""
    folder = require_corpus(data_dir, name)
    docs = read_documents(folder)
    if not docs:  # only blank lines in its files
        raise _no_text(folder)
    heldout = [d for d in docs if _is_heldout(d)]
    train = [d for d in docs if not _is_heldout(d)]
    if len(docs) == 1:
        # One document: hold out its last tenth, cut at a line break where there is one.
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1 or int(len(text) * 0.9)
        train, heldout = [text[:cut]], [text[cut:]]
    elif not heldout:
        train, heldout = docs[:-1], docs[-1:]
    elif not train:
        train, heldout = heldout[:-1], heldout[-1:]
    return Domain(name=name, train=train, heldout=heldout)


def corpus_digest(folder: Path) -> str:
    """A digest of a domain folder's text files (names and bytes), to notice changes."""
    h = hashlib.sha256()
    for path in text_files(folder):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
