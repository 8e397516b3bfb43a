"""Word-window chunking."""

from __future__ import annotations

import pytest

from kbrouter.kb.chunking import chunk_id, chunk_passages, word_windows


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_short_text_is_one_window_with_normalised_spaces():
    """A text within one window is kept whole (whitespace collapsed)."""
    assert word_windows("a  b\n c", words=100, stride=50) == ["a b c"]


def test_paper_windows_100_stride_50_cover_all_words():
    """250 words -> windows starting at 0, 50, 100, 150; every word appears in a window."""
    wins = word_windows(_words(250), words=100, stride=50)
    assert [w.split()[0] for w in wins] == ["w0", "w50", "w100", "w150"]
    assert all(len(w.split()) == 100 for w in wins)
    covered = {t for w in wins for t in w.split()}
    assert covered == {f"w{i}" for i in range(250)}


def test_last_window_is_aligned_to_the_end():
    """A tail shorter than the stride does not make a tiny window: the last one ends at the end."""
    wins = word_windows(_words(120), words=100, stride=50)
    assert len(wins) == 2
    assert wins[-1].split()[0] == "w20" and wins[-1].split()[-1] == "w119"


def test_exactly_one_window_plus_one_word():
    wins = word_windows(_words(101), words=100, stride=50)
    assert [w.split()[0] for w in wins] == ["w0", "w1"]


@pytest.mark.parametrize(("words", "stride"), [(0, 1), (10, 0), (10, 11)])
def test_invalid_window_settings_raise(words, stride):
    with pytest.raises(ValueError):
        word_windows("a b c", words=words, stride=stride)


def test_chunk_ids_keep_whole_passages_and_number_split_ones():
    """Whole passages keep their id; split ones get <id>#<n> and know their document."""
    chunks = chunk_passages([("a", "T", "short text"), ("b", "U", _words(150))], 100, 50)
    assert [c.id for c in chunks] == ["a", "b#0", "b#1"]
    assert {c.doc_id for c in chunks[1:]} == {"b"}
    assert chunks[2].title == "U" and chunks[2].n_chunks == 2
    assert chunk_id("x", 0, 1) == "x" and chunk_id("x", 3, 5) == "x#3"
