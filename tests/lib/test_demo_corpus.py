"""The demo corpus: reproducible, capped, atomic, and never touching user text."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from shiftable_lib import demo_corpus
from shiftable_lib.corpus import DOCUMENT_SEPARATOR, load_domain, split_documents, text_files
from shiftable_lib.demo_corpus import (
    DEMO_DOMAINS,
    DemoDomainStats,
    DocGroup,
    MissingExtra,
    build_demo_corpus,
    chunk_entries,
    clean_text,
    default_repr,
    select_round_robin,
)
from shiftable_lib.errors import Conflict

CAP = 200_000
CAPS = dict.fromkeys(DEMO_DOMAINS, CAP)
KEYWORDS = {
    "general": ("json", "list"),
    "datascience": ("array", "numpy"),
    "deeplearning": ("tensor",),
}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, list[DemoDomainStats]]]:
    """Two builds with small caps, each into its own data folder."""
    results = []
    for _ in range(2):
        data_dir = tmp_path_factory.mktemp("data")
        results.append((data_dir, build_demo_corpus(data_dir, max_bytes=CAPS)))
    return results


def test_two_builds_are_byte_identical(builds: list[tuple[Path, list[DemoDomainStats]]]) -> None:
    (first, first_stats), (second, second_stats) = builds
    assert first_stats == second_stats
    for name in DEMO_DOMAINS:
        assert folder_bytes(first / name) == folder_bytes(second / name)


def test_every_domain_loads_with_train_and_heldout(builds) -> None:
    data_dir, stats = builds[0]
    assert [s.name for s in stats] == list(DEMO_DOMAINS)
    for s in stats:
        assert not s.skipped and s.documents > 1 and s.files
        domain = load_domain(data_dir, s.name)
        assert domain.train and domain.heldout
        # Documents survive the round trip: none holds a document break inside it.
        assert len(domain.train) + len(domain.heldout) + len(domain.calibration) == s.documents
        text = " ".join(domain.train + domain.heldout + domain.calibration).lower()
        assert any(word in text for word in KEYWORDS[s.name]), s.name


def test_caps_are_honoured_and_stats_match_files(builds) -> None:
    data_dir, stats = builds[0]
    for s in stats:
        paths = text_files(data_dir / s.name)
        assert tuple(p.name for p in paths) == s.files
        assert s.bytes == sum(p.stat().st_size for p in paths) <= CAP
        assert s.bytes > CAP // 2  # the cap is filled, not just respected
        for path in paths:
            text = path.read_text(encoding="utf-8")
            assert text.endswith("\n") and not text.endswith("\n\n")
            assert "\r" not in text


def test_no_temporary_folders_remain(builds) -> None:
    for data_dir, _ in builds:
        assert sorted(p.name for p in data_dir.iterdir()) == sorted(DEMO_DOMAINS)


def test_user_domain_is_left_alone_and_reported_skipped(tmp_path: Path) -> None:
    (tmp_path / "general").mkdir()
    mine = tmp_path / "general" / "mine.txt"
    mine.write_bytes(b"my own text\n\n\n\xff not even utf-8\n")
    (tmp_path / "deeplearning").mkdir()  # an empty folder is filled
    stats = build_demo_corpus(tmp_path, domains=("general", "deeplearning"), max_bytes=CAPS)
    general, deeplearning = stats
    assert general == DemoDomainStats("general", 2, mine.stat().st_size, ("mine.txt",), True)
    assert folder_bytes(tmp_path / "general") == {"mine.txt": mine.read_bytes()}
    assert mine.read_bytes() == b"my own text\n\n\n\xff not even utf-8\n"
    assert not deeplearning.skipped and text_files(tmp_path / "deeplearning")
    assert not (tmp_path / "datascience").exists()


def test_folder_with_other_files_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "datascience").mkdir()
    (tmp_path / "datascience" / "notes.md").write_text("not a corpus")
    with pytest.raises(Conflict, match="datascience"):
        build_demo_corpus(tmp_path, max_bytes=CAPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datascience"]
    with pytest.raises(ValueError, match="unknown demo domain"):
        build_demo_corpus(tmp_path, domains=("poetry",))


def test_failure_while_writing_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def fail(tmp: Path, target: Path) -> bool:
        raise OSError("disk full")

    monkeypatch.setattr(demo_corpus, "install_folder", fail)
    with pytest.raises(OSError, match="disk full"):
        build_demo_corpus(tmp_path, domains=("general",), max_bytes=CAPS)
    assert list(tmp_path.iterdir()) == []


def test_clean_text_keeps_documents_whole() -> None:
    raw = "a  \r\n\r\n\r\n\n b\t\n<object object at 0x7f3a2b>\n"
    raw += "x = 3.5  # may vary\n>>> f()  # may vary"
    cleaned = clean_text(raw)
    assert cleaned == "a\n\n b\n<object object>\n...  # may vary\n>>> f()  # may vary"
    assert split_documents(DOCUMENT_SEPARATOR.join([cleaned, cleaned])) == [cleaned, cleaned]


def test_chunks_respect_the_limit_and_drop_scraps() -> None:
    entries = ["head\n" + "\n\n".join(f"paragraph {i} " + "word " * 30 for i in range(40)), "tiny"]
    chunks = chunk_entries(entries, limit=1000)
    assert len(chunks) > 3
    assert all(200 <= len(c) <= 1000 for c in chunks)
    assert all("\n\n\n" not in c for c in chunks)
    assert chunk_entries(["x" * 2500], limit=1000) == ("x" * 1000, "x" * 1000, "x" * 500)


def test_default_reprs_are_stable() -> None:
    assert default_repr(frozenset({"b", "a"})) == "frozenset({'a', 'b'})"
    assert default_repr(object()) == "<object>"
    assert default_repr(len) == "len"
    assert default_repr(os.sep) == repr(os.sep)


def test_round_robin_spreads_over_groups() -> None:
    groups = [DocGroup("s", name, tuple(f"{name}{i}" * 10 for i in range(5))) for name in "abc"]
    kept = select_round_robin(groups, cap=3 * 2 * 23)  # room for two documents per group
    assert [g.documents for g in kept] == [g.documents[:2] for g in groups]


def test_zero_cap_writes_nothing(tmp_path: Path) -> None:
    stats = build_demo_corpus(tmp_path, domains=("general",), max_bytes={"general": 0})
    assert stats == [DemoDomainStats("general", 0, 0, (), False)]
    assert list(tmp_path.iterdir()) == []


def test_missing_scipy_names_the_extra_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if not installed: find_spec is None
    with pytest.raises(MissingExtra, match=r"pip install 'shiftable\[demo\]'"):
        build_demo_corpus(tmp_path / "data", max_bytes=CAPS)
    assert not (tmp_path / "data").exists()
    # a datascience folder that already holds text needs no scipy: it is left alone
    write = tmp_path / "data" / "datascience"
    write.mkdir(parents=True)
    (write / "mine.txt").write_text("my own numbers\n")
    stats = build_demo_corpus(tmp_path / "data", domains=("datascience",), max_bytes=CAPS)
    assert stats[0].skipped
