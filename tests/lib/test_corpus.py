"""Corpora: discovery, names, documents and the held-out split; bad input creates nothing."""

from __future__ import annotations

import itertools

import pytest

from shiftable_lib import corpus as corpus_module
from shiftable_lib.config import get_profile
from shiftable_lib.corpus import (
    HELDOUT_PERMILLE,
    MIN_HELDOUT_SHARE,
    PIECE_CHARS,
    check_corpus,
    discover_specialists,
    load_domain,
    min_tokens,
    sampled,
    split_documents,
    split_heldout,
    validate_specialist_name,
)
from shiftable_lib.errors import CorpusInvalid, CorpusMissing, CorpusTooSmall, InvalidName
from shiftable_lib.tokenizer import train_tokenizer
from tests.conftest import synthetic_documents, write_domain

BAD_NAMES = [
    "",
    "general",
    "../etc",
    "..",
    "a/b",
    "a\\b",
    "Ds",
    "1ds",
    "-ds",
    "ds.txt",
    " ds",
    "ds\n",
    "x" * 65,
    "dé",
    ".deleted",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_specialist_names_are_refused_with_a_reason(name, tmp_path):
    with pytest.raises(InvalidName, match="specialist"):
        validate_specialist_name(name)
    if name != "general":  # a valid domain, just not a specialist
        with pytest.raises(InvalidName):
            load_domain(tmp_path, name)
    assert list(tmp_path.iterdir()) == [], "a refused name created something"


def test_non_string_names_are_refused():
    with pytest.raises(InvalidName, match="string"):
        validate_specialist_name(None)


@pytest.mark.parametrize("name", ["ds", "a", "data_science-2", "x" * 64])
def test_good_names_are_accepted(name):
    assert validate_specialist_name(name) == name


def test_discovery_finds_specialist_folders_with_text_only(tmp_path):
    data = tmp_path / "data"
    write_domain(data, "general", ["g"])
    write_domain(data, "ds", ["d"])
    (data / "empty").mkdir()
    (data / "blank").mkdir()
    (data / "blank" / "a.txt").write_text("")
    (data / "notes").mkdir()
    (data / "notes" / "a.md").write_text("not a txt")
    write_domain(data, "Bad Name", ["x"])
    write_domain(data / ".deleted", "old", ["x"])
    assert discover_specialists(data) == ["ds"]


def test_documents_are_separated_by_two_blank_lines():
    text = "one\nstill one\n\nstill one\n\n\ntwo\n \n\t\nthree\n"
    assert split_documents(text) == ["one\nstill one\n\nstill one", "two", "three"]


def test_the_splits_are_deterministic_and_disjoint(tmp_path):
    docs = synthetic_documents("general", 200)
    write_domain(tmp_path, "general", docs[:100], "a.txt")
    write_domain(tmp_path, "general", docs[100:], "b.txt")
    first, second = load_domain(tmp_path, "general"), load_domain(tmp_path, "general")
    assert first == second
    train, heldout, calibration = set(first.train), set(first.heldout), set(first.calibration)
    assert not train & heldout and not train & calibration and not heldout & calibration
    assert 5 <= len(first.heldout) <= 40
    assert 2 <= len(first.calibration) <= 20  # the hash's next 5%
    assert len(first.train) + len(first.heldout) + len(first.calibration) == 200
    # the held-out split is what it was before calibration text was set apart
    assert split_heldout(docs)[1] == first.heldout


def test_a_corpus_with_few_documents_sets_no_calibration_text_apart(tmp_path):
    write_domain(tmp_path, "ds", synthetic_documents("ds", 3))
    domain = load_domain(tmp_path, "ds")
    assert domain.calibration == [] and len(domain.train) + len(domain.heldout) == 3


def test_a_single_document_still_has_a_held_out_part(tmp_path):
    write_domain(tmp_path, "ds", ["line of text\n" * 100])
    domain = load_domain(tmp_path, "ds")
    assert domain.train and domain.heldout
    assert domain.train[0] + domain.heldout[0] == "line of text\n" * 99 + "line of text"


def test_missing_or_empty_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusMissing, match="create"):
        load_domain(tmp_path, "ds")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.txt").write_text("  \n\n\n  \n")
    with pytest.raises(CorpusMissing, match="holds no text"):
        load_domain(tmp_path, "ds")


def test_a_file_that_is_not_utf8_is_named_in_the_error(tmp_path):
    folder = write_domain(tmp_path, "ds", ["fine text"])
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusInvalid, match=r"latin1\.txt is not valid UTF-8"):
        load_domain(tmp_path, "ds")


def test_links_out_of_the_data_folder_are_never_followed(tmp_path):
    """A specialist folder, or a .txt file in one, that links outside data/ is refused wherever
    corpora are read: discovery, the check before an add, and loading for training."""
    data = tmp_path / "data"
    write_domain(data, "general", synthetic_documents("general", 3))
    outside = write_domain(tmp_path / "elsewhere", "x", ["private text"])
    (data / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CorpusInvalid, match="linked links outside"):
        discover_specialists(data)
    (data / "linked").unlink()
    (data / "leaky").mkdir()
    (data / "leaky" / "a.txt").symlink_to(outside / "corpus.txt")
    for read in (check_corpus, load_domain):
        with pytest.raises(CorpusInvalid, match=r"a\.txt links outside"):
            read(data, "leaky")
    (data / "leaky" / "a.txt").unlink()
    (data / "leaky" / "a.txt").symlink_to(data / "general" / "corpus.txt")  # inside: fine
    assert check_corpus(data, "leaky").files == 1


def _lines(n: int, seed: int = 0) -> str:
    """`n` lines of synthetic text with no blank line between them."""
    words = synthetic_documents("general", n, seed=seed)
    return "\n".join(w[:70].strip() for w in words) + "\n"


def test_text_without_blank_lines_is_cut_into_pieces_at_line_breaks(tmp_path):
    text = _lines(2000)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "one.txt").write_text(text)
    domain = load_domain(tmp_path, "notes")
    docs = [*domain.train, *domain.heldout, *domain.calibration]
    assert len(docs) > 20
    assert all(len(d) <= PIECE_CHARS * 3 // 2 for d in docs)
    assert all(d == d.strip() and not d.startswith(" ") for d in docs)
    assert sorted("\n".join(docs).split("\n")) == sorted(text.strip().split("\n"))  # nothing lost
    heldout = sum(map(len, domain.heldout)) / sum(map(len, docs))
    assert 0.05 <= heldout <= 0.3, heldout


def test_windows_and_old_mac_line_ends_split_like_unix_ones():
    unix = "one\nstill one\n\n\ntwo\n\n\n\nthree"
    for ending in ("\r\n", "\r"):
        assert split_documents(unix.replace("\n", ending)) == ["one\nstill one", "two", "three"]


def test_one_huge_document_among_small_ones_is_cut_but_small_ones_stay_whole():
    small = synthetic_documents("ds", 5)
    huge = " ".join(synthetic_documents("dl", 400))  # one paragraph, no line break at all
    docs = split_documents("\n\n\n".join([small[0], huge, *small[1:]]))
    assert docs[0] == small[0] and docs[-4:] == small[1:]
    pieces = docs[1:-4]
    assert len(pieces) == pytest.approx(len(huge) / PIECE_CHARS, abs=2)
    assert " ".join(pieces) == huge  # cut at spaces, where there is no line to cut at


def test_many_tiny_files_are_documents_and_some_are_held_out(tmp_path):
    for i, doc in enumerate(synthetic_documents("ds", 300)):
        write_domain(tmp_path, "tiny", [doc], f"{i:03}.txt")
    corpus = check_corpus(tmp_path, "tiny")
    assert (corpus.files, corpus.documents) == (300, 300)
    assert corpus.heldout_documents >= 10
    assert corpus.heldout_chars / corpus.chars >= MIN_HELDOUT_SHARE


def test_few_documents_still_hold_out_a_share_of_the_text():
    """Two large documents and many small ones: if the hash picks only small ones, the next
    ones by the same order join them until a tenth of the text is held out."""
    docs = [*(f"short note {i}." for i in range(30)), "x " * 30000, "y " * 30000]
    train_docs, heldout = split_heldout(docs)
    total = sum(map(len, docs))
    assert sum(map(len, heldout)) >= HELDOUT_PERMILLE / 1000 * total or len(train_docs) == 1
    assert train_docs and heldout
    assert sorted(train_docs + heldout) == sorted(docs)
    assert split_heldout(docs) == (train_docs, heldout)  # deterministic


def test_the_corpus_report_counts_tokens_and_a_corpus_too_small_is_refused(tmp_path):
    tok = train_tokenizer(synthetic_documents("general", 50), 384)
    profile = get_profile("tiny")
    write_domain(tmp_path, "ds", synthetic_documents("ds", 60))
    corpus = check_corpus(tmp_path, "ds", tok, profile)
    assert corpus.tokens > 0 and corpus.heldout_tokens > 0 and not corpus.estimated
    assert corpus.documents == 60 and 0 < corpus.heldout_documents < 60
    need_train, need_heldout = min_tokens(profile)
    assert corpus.tokens >= need_train and corpus.heldout_tokens >= need_heldout
    write_domain(tmp_path, "small", synthetic_documents("ds", 3))
    with pytest.raises(CorpusTooSmall, match="too little text to learn from") as refused:
        check_corpus(tmp_path, "small", tok, profile)
    assert f"needs at least {need_train:,} to train on" in str(refused.value)
    assert check_corpus(tmp_path, "small").documents == 3  # without a model: reported only


def test_a_large_corpus_has_its_tokens_estimated_from_a_part(tmp_path, monkeypatch):
    tok = train_tokenizer(synthetic_documents("general", 50), 384)
    write_domain(tmp_path, "ds", synthetic_documents("ds", 200))
    exact = check_corpus(tmp_path, "ds", tok)
    monkeypatch.setattr(corpus_module, "COUNTED_CHARS", exact.chars // 5)
    estimate = check_corpus(tmp_path, "ds", tok)
    assert estimate.estimated and not exact.estimated
    assert estimate.tokens == pytest.approx(exact.tokens, rel=0.1)


def test_a_sample_of_a_large_domain_spreads_over_it_and_a_small_one_is_read_whole(tmp_path):
    docs = [f"document {i:04d} " + "x" * (100 + i % 50) for i in range(2000)]
    write_domain(tmp_path, "big", docs)
    domain = load_domain(tmp_path, "big")
    chars = sum(map(len, domain.train))
    part = sampled(domain, chars // 4)
    kept = sum(map(len, part.train))
    assert not part.whole and chars // 4 - 200 <= kept <= chars // 4 + 200
    assert sum(map(len, part.heldout)) <= chars // 40 + 200
    # evenly spread, in order: from the first tenth of the documents to the last
    positions = [domain.train.index(d) for d in part.train]
    assert positions == sorted(positions)
    assert positions[0] < len(domain.train) // 10 and positions[-1] > len(domain.train) * 9 // 10
    gaps = [b - a for a, b in itertools.pairwise(positions)]
    assert max(gaps) <= 6, gaps  # about one in four, never a long stretch left out
    whole = sampled(domain, chars * 2)
    assert whole.whole and whole.train == domain.train and whole.heldout == domain.heldout
