"""`sma corpus demo`: an offline, reproducible demo corpus built from installed documentation.

Three domains, all from text that ships inside installed Python packages:

- `general`: the pydoc topics and the docstrings of the standard library;
- `datascience`: numpy and scipy docstrings (scipy is the `demo` extra:
  `pip install 'shiftable[demo]'`; without it, building this domain fails with that advice);
- `deeplearning`: torch docstrings.

A document is one pydoc topic, or one module's documentation (its docstring, then a header line
and the docstring of each public member), cut into chunks of at most `CHUNK_CHARS` characters.
The same interpreter and packages give the same bytes every run: modules and members are sorted,
memory addresses and set orders never reach the text, and caps keep whole documents chosen
round-robin over modules. Each domain is written to a hidden temporary folder and renamed into
place, so a crash never leaves a half-written domain, and a folder that already holds text is
never touched.

The package: `sources` says which modules each domain documents, `extract` renders them as
documents, and this module caps, writes and builds.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from shiftable_lib.corpus import DOCUMENT_SEPARATOR, split_documents, text_files
from shiftable_lib.demo_corpus.extract import (
    CHUNK_CHARS,
    MIN_DOC_CHARS,
    DocGroup,
    chunk_entries,
    clean_text,
    default_repr,
)
from shiftable_lib.demo_corpus.sources import GROUP_SOURCES, MissingExtra, check_packages
from shiftable_lib.durable import fsync_dir, write_file
from shiftable_lib.errors import Conflict

__all__ = [
    "CHUNK_CHARS",
    "DEFAULT_MAX_BYTES",
    "DEMO_DOMAINS",
    "MIN_DOC_CHARS",
    "DemoDomainStats",
    "DocGroup",
    "MissingExtra",
    "build_demo_corpus",
    "chunk_entries",
    "clean_text",
    "default_repr",
    "select_round_robin",
]

DEMO_DOMAINS: tuple[str, ...] = ("general", "datascience", "deeplearning")
DEFAULT_MAX_BYTES: dict[str, int] = {
    "general": 6_000_000,
    "datascience": 3_000_000,
    "deeplearning": 3_000_000,
}
MAX_FILE_BYTES = 2_000_000
# Stop importing once this many times the cap is collected: small caps (tests) stay fast, while
# the default caps still see every module, so the round-robin spreads over all of them.
COLLECT_FACTOR = 3


@dataclass(frozen=True)
class DemoDomainStats:
    name: str
    documents: int
    bytes: int
    files: tuple[str, ...]
    skipped: bool  # True when the domain folder already had text and was left alone


# --- caps ---------------------------------------------------------------------------------------


def doc_cost(doc: str) -> int:
    """Bytes a document adds to a file, separator included (an upper bound on the real size)."""
    return len(doc.encode("utf-8")) + len(DOCUMENT_SEPARATOR)


def collect(groups: Iterator[DocGroup], cap: int) -> list[DocGroup]:
    """Non-empty groups in order, stopping once `COLLECT_FACTOR * cap` bytes are at hand."""
    collected: list[DocGroup] = []
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated attributes warn when looked up
        for group in groups:
            if group.documents:
                collected.append(group)
                total += sum(map(doc_cost, group.documents))
            if total >= COLLECT_FACTOR * cap:
                break
    return collected


def select_round_robin(groups: Sequence[DocGroup], cap: int) -> list[DocGroup]:
    """Keep whole documents within `cap`: each group's first, then each one's second, ...

    so a cap trims the largest modules instead of the ones late in the alphabet.
    """
    kept = [[False] * len(g.documents) for g in groups]
    budget = cap
    for i in range(max((len(g.documents) for g in groups), default=0)):
        for g, keep in zip(groups, kept, strict=True):
            if i < len(g.documents) and doc_cost(g.documents[i]) <= budget:
                keep[i] = True
                budget -= doc_cost(g.documents[i])
    return [
        replace(g, documents=tuple(d for d, k in zip(g.documents, keep, strict=True) if k))
        for g, keep in zip(groups, kept, strict=True)
    ]


# --- writing ------------------------------------------------------------------------------------


def file_contents(groups: Sequence[DocGroup]) -> dict[str, str]:
    """File name -> text: one file per source, split into numbered files past MAX_FILE_BYTES."""
    by_source: dict[str, list[str]] = {}
    for group in groups:
        by_source.setdefault(group.source, []).extend(group.documents)
    files: dict[str, str] = {}
    for source in sorted(by_source):
        parts: list[list[str]] = [[]]
        size = 0
        for doc in by_source[source]:
            if parts[-1] and size + doc_cost(doc) > MAX_FILE_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(doc)
            size += doc_cost(doc)
        for i, docs in enumerate(p for p in parts if p):
            name = f"{source}.txt" if len(parts) == 1 else f"{source}-{i + 1:02d}.txt"
            files[name] = DOCUMENT_SEPARATOR.join(docs) + "\n"
    return files


def write_folder(folder: Path, files: Mapping[str, str]) -> None:
    folder.mkdir()
    for name, text in files.items():
        write_file(folder / name, text.encode("utf-8"))
    fsync_dir(folder)


def existing_stats(name: str, folder: Path) -> DemoDomainStats:
    """Stats of a domain folder that already holds text (decoded leniently: it is not ours)."""
    paths = text_files(folder)
    texts = [p.read_bytes().decode("utf-8", "replace") for p in paths]
    return DemoDomainStats(
        name=name,
        documents=sum(len(split_documents(t)) for t in texts),
        bytes=sum(p.stat().st_size for p in paths),
        files=tuple(p.name for p in paths),
        skipped=True,
    )


def install_folder(tmp: Path, target: Path) -> bool:
    """Move `tmp` to `target` atomically; False when someone else filled `target` first."""
    if target.is_dir() and not any(target.iterdir()):
        os.rmdir(target)  # os.replace cannot replace a directory, even an empty one
    try:
        os.replace(tmp, target)
    except OSError:
        if text_files(target):
            return False  # a concurrent build won the race; its text stays
        raise
    fsync_dir(target.parent)
    return True


def write_domain(data_dir: Path, name: str, groups: Sequence[DocGroup]) -> DemoDomainStats:
    """Write the domain's files through a hidden temporary folder renamed into place."""
    files = file_contents(groups)
    target = data_dir / name
    tmp = data_dir / f".tmp-demo-{name}-{os.getpid()}"
    if not files:  # nothing to document (a zero cap): leave no empty folder behind
        return DemoDomainStats(name, documents=0, bytes=0, files=(), skipped=False)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed run that had this pid
        write_folder(tmp, files)
        if not install_folder(tmp, target):
            return existing_stats(name, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoDomainStats(
        name=name,
        documents=sum(len(g.documents) for g in groups),
        bytes=sum(len(text.encode("utf-8")) for text in files.values()),
        files=tuple(sorted(files)),
        skipped=False,
    )


def check_targets(data_dir: Path, domains: Sequence[str]) -> None:
    """Fail before any work when a domain name is unknown or its path holds something else."""
    for name in domains:
        if name not in DEMO_DOMAINS:
            raise ValueError(f"unknown demo domain {name!r}: choose from {', '.join(DEMO_DOMAINS)}")
        target = data_dir / name
        if target.exists() and not target.is_dir():
            raise Conflict(f"{target} exists and is not a folder: move it away first")
        if target.is_dir() and not text_files(target) and any(target.iterdir()):
            raise Conflict(
                f"{target} holds files but no non-empty .txt: move them away or add text first"
            )


def build_demo_corpus(
    data_dir: Path,
    *,
    domains: Sequence[str] = DEMO_DOMAINS,
    max_bytes: Mapping[str, int] | None = None,
) -> list[DemoDomainStats]:
    """Write the demo corpus under data_dir; never touches a domain folder that already holds text.

    Returns one entry per domain, in the order of `domains`. `max_bytes` overrides the per-domain
    caps of DEFAULT_MAX_BYTES. Raises ValueError for an unknown domain, Conflict when a domain
    path holds something other than text, and MissingExtra when a domain to build needs a
    package that is not installed (scipy), all before anything is written.
    """
    data_dir = Path(data_dir)
    check_targets(data_dir, domains)
    check_packages([name for name in domains if not text_files(data_dir / name)])
    caps = {**DEFAULT_MAX_BYTES, **(max_bytes or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    stats = []
    for name in domains:
        if text_files(data_dir / name):
            stats.append(existing_stats(name, data_dir / name))
            continue
        groups = collect(GROUP_SOURCES[name](), caps[name])
        stats.append(write_domain(data_dir, name, select_round_robin(groups, caps[name])))
    return stats
