"""Corpora: discovery, names, documents and the held-out split; bad input creates nothing."""

from __future__ import annotations

import pytest

from shiftable_lib.corpus import (
    check_corpus,
    discover_specialists,
    load_domain,
    split_documents,
    validate_specialist_name,
)
from shiftable_lib.errors import CorpusInvalid, CorpusMissing, InvalidName
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


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
    docs = synthetic_documents("general", 200)
    write_domain(tmp_path, "general", docs[:100], "a.txt")
    write_domain(tmp_path, "general", docs[100:], "b.txt")
    first, second = load_domain(tmp_path, "general"), load_domain(tmp_path, "general")
    assert first == second
    assert not set(first.train) & set(first.heldout)
    assert 5 <= len(first.heldout) <= 40
    assert len(first.train) + len(first.heldout) == 200


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
