"""The bounded keyword search (tasks/bm25.py) against FTS5's own bm25() ranking on the same table.

A small generated collection written through `IndexDB.write` (text and heading columns, stemmed
words, repeated words, accents, identifiers FTS5 splits into phrases), queried both ways: FTS5's
`ORDER BY bm25 LIMIT n` and `BoundedBM25.top`. Where the bounded path says `exact`, its ids equal
FTS5's and its scores equal FTS5's to float rounding; with a budget too small to prove it, it says so.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmos.tasks import bm25
from llmos.tasks.index_db import EmbedModel, IndexDB
from llmos.tasks.ingest import Chunk

MODEL = EmbedModel("test", "test", "fp", 4)
WORDS = ("parse parser parsing parsed file files filing connect connection connected running runs run socket "
         "thread threads threading lock locked queue value values default defaults object objects buffer "
         "encode encoding decoded timeout retry retries café naïve résumé über straße archive archives").split()
HEADINGS = ("Networking", "Files > Reading", "Concurrency", "", "Café notes")


def _text(rng: np.random.Generator, i: int) -> str:
    words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(3, 30))]
    if i % 7 == 0:
        words += ["co_flags", "max_size"]
    if i % 11 == 0:
        words += ["rare_word", "zebra"]
    return f"Row {i}: " + " ".join(words) + "."


def _write(db: IndexDB, name: str, rng: np.random.Generator, first: int, n: int) -> None:
    chunks = [Chunk(_text(rng, i), (HEADINGS[i % len(HEADINGS)],) if HEADINGS[i % len(HEADINGS)] else (), 0, 1, 1, 1,
                    None, 3) for i in range(first, first + n)]
    db.write(name, "text", "sha", 1, {}, MODEL, [(chunks, np.zeros((n, 4), dtype=np.float32))])


@pytest.fixture()
def db(tmp_path):
    db = IndexDB(tmp_path / "i.sqlite")
    rng = np.random.default_rng(7)
    for d in range(4):
        _write(db, f"doc{d}", rng, 100 * d, 100)
    yield db
    db.close()


QUERIES = [
    "parsing files",  # stems: parse/parser/parsed and file/files/filing
    "connect connection connected socket",  # three words, one term: FTS5 counts each phrase
    "Café naïve resume",  # diacritics folded by remove_diacritics 2
    "the and of",  # stopwords only: kept, as the query has nothing else
    "value object default",  # common words only
    "zebra threading lock",  # one rare word
    "co_flags values",  # a word FTS5 reads as a two-term phrase
    "xylophone",  # absent from the index
    "xylophone zebra",  # one absent, one present
    "Networking retries",  # a heading word
]


def _fts5(db: IndexDB, query: str, n: int) -> list[tuple[int, float]]:
    return db.keyword_ranked(query, n, bounded=False).rows


def _same(exact: list[tuple[int, float]], ours: list[tuple[int, float]]) -> None:
    assert [i for i, _ in ours] == [i for i, _ in exact] or sorted(ours) == sorted(exact)  # ties may come in either order
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in exact], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 10, 50])
def test_bounded_equals_fts5_where_it_says_exact(db, n):
    proven = 0
    for query in QUERIES:
        ranked = db.keyword_ranked(query, n, bounded=True)
        if ranked.exact:
            proven += 1
            _same(_fts5(db, query, n), ranked.rows)
    assert proven == len(QUERIES)  # the default budget covers a collection this small


def test_pruned_lists_are_still_fts5s(db):
    """Budgets that let it read only the rarest words and score few rows: what it proves holds."""
    searcher = bm25.BoundedBM25(db._db, "chunks_fts", "porter unicode61 remove_diacritics 2", 2)
    proven = 0
    for query in QUERIES:
        words = db._query_words(query)
        for budget in (1, 30, 100):
            ranked = searcher.top(words, 5, max_postings=budget, max_scored=60, first=5)
            assert len(ranked.rows) <= 5 and ranked.scored <= max(60, 5)
            if ranked.exact:
                proven += 1
                _same(_fts5(db, query, 5), ranked.rows)
            else:  # the best it found are still scored as FTS5 scores them
                full = dict(_fts5(db, query, 400))
                for i, s in ranked.rows:
                    assert s == pytest.approx(full[i], rel=1e-12)
    assert proven >= 5  # the rare-word queries are proven with a small budget


def test_budget_hit_is_flagged(db):
    searcher = bm25.BoundedBM25(db._db, "chunks_fts", "porter unicode61 remove_diacritics 2", 2)
    words = db._query_words("value object default files")
    ranked = searcher.top(words, 10, max_postings=20, max_scored=30, first=10)
    rows = searcher.totals()[0]
    assert ranked.postings == min(searcher.df(p, rows) for p in searcher.terms(words))  # the rarest word's rows only
    assert not ranked.exact and ranked.scored <= 30
    assert [i for i, _ in ranked.rows] != [i for i, _ in _fts5(db, "value object default files", 10)]


def test_document_frequencies_follow_deletes_and_adds(db):
    query = "zebra parsing"
    before = db.keyword_ranked(query, 10, bounded=True)
    _same(_fts5(db, query, 10), before.rows)
    db.delete("doc1")  # a quarter of the rows: past the 1% the cached counts allow
    after = db.keyword_ranked(query, 10, bounded=True)
    assert after.exact
    _same(_fts5(db, query, 10), after.rows)
    assert after.rows != before.rows
    _write(db, "doc1", np.random.default_rng(99), 1000, 150)  # re-added under new ids, other text
    again = db.keyword_ranked(query, 10, bounded=True)
    assert again.exact
    _same(_fts5(db, query, 10), again.rows)


def test_query_words_become_fts5_terms(db):
    searcher = bm25.BoundedBM25(db._db, "chunks_fts", "porter unicode61 remove_diacritics 2", 2)
    assert searcher.terms(["parsing", "connected", "café", "straße", "co_flags", "__init__"]) == [
        ("pars",), ("connect",), ("cafe",), ("straß",), ("co", "flag"), ("init",)]
    rows, avgdl = searcher.totals()
    assert rows == db._db.execute("SELECT count(*) FROM chunks_fts").fetchone()[0]
    sizes = [sum(bm25._varints(r[0])) for r in db._db.execute("SELECT sz FROM chunks_fts_docsize")]
    assert avgdl == pytest.approx(sum(sizes) / len(sizes), rel=1e-12)


def test_keyword_picks_the_bounded_path_by_size(db, monkeypatch):
    query = "parsing socket"
    small = db.keyword(query, 10)
    monkeypatch.setattr("llmos.tasks.index_db.BOUNDED_ROWS", 10)
    assert db.keyword(query, 10) == small  # the same list, the same scores either way here
    assert db._bm25 is not None


def test_unread_common_words_can_beat_the_rare_one(tmp_path):
    """Short rows repeating a common word outscore the one long row holding the rare word: read only
    the rare word's rows, the list cannot be proven (the common word's bound reaches the best score)."""
    db = IndexDB(tmp_path / "j.sqlite")
    texts = [f"filler{i} alpha beta gamma delta" for i in range(40)] + ["common common common common"] * 5
    texts += ["rare " + " ".join(f"long{i}" for i in range(50))] + [f"common word{i} more text here" for i in range(5)]
    chunks = [Chunk(t, (), 0, 1, 1, 1, None, 3) for t in texts]
    db.write("doc", "text", "sha", 1, {}, MODEL, [(chunks, np.zeros((len(chunks), 4), dtype=np.float32))])
    searcher = bm25.BoundedBM25(db._db, "chunks_fts", "porter unicode61 remove_diacritics 2", 2)
    pruned = searcher.top(["rare", "common"], 1, max_postings=5, first=1)
    assert pruned.postings == 1 and not pruned.exact
    full = searcher.top(["rare", "common"], 1)
    assert full.exact
    _same(_fts5(db, "rare common", 1), full.rows)
    assert full.rows[0][0] != pruned.rows[0][0]
    db.close()


@pytest.mark.parametrize("size", [300, 200_000])
def test_best_is_the_m_largest_in_order(size):
    rng = np.random.default_rng(size)
    values = rng.integers(0, 50, size).astype(np.float32)  # many ties, zeros among them
    picked = bm25._best(values, 100)
    assert len(picked) == 100 and len(set(picked.tolist())) == 100
    assert values[picked].tolist() == sorted(values, reverse=True)[:100]


def test_the_word_cache_is_emptied_between_queries_only(db, monkeypatch):
    monkeypatch.setattr(bm25, "_WORDS_CACHED", 5)  # scoring adds every word of the scored rows: far past 5
    for query in QUERIES:
        ranked = db.keyword_ranked(query, 10, bounded=True)
        if ranked.exact:
            _same(_fts5(db, query, 10), ranked.rows)


def test_a_row_added_with_a_rare_word_is_found_at_once(db):
    query = "xylophone parsing"
    assert all(i < 400 for i, _ in db.keyword_ranked(query, 10, bounded=True).rows)
    chunk = Chunk("A xylophone tune.", (), 0, 1, 1, 1, None, 3)  # one row: well under the 1% drift
    db.write("doc9", "text", "sha", 1, {}, MODEL, [([chunk], np.zeros((1, 4), dtype=np.float32))])
    ranked = db.keyword_ranked(query, 10, bounded=True)
    assert ranked.rows[0][0] == _fts5(db, query, 10)[0][0] and ranked.rows[0][0] >= 400
    _same(_fts5(db, query, 10), ranked.rows)


def test_a_writer_in_another_connection_mid_query_is_not_seen(db, tmp_path):
    db.keyword_ranked("zebra", 10, bounded=True)  # makes the searcher; the query's words are read fresh below
    query = "threading lock parsing"
    other = IndexDB(db.path)
    searcher = db._bm25
    top_id = searcher._top_id
    last = top_id()  # the late rows get ids above this

    def top_id_then_write() -> int:
        value = top_id()
        _write(other, "late", np.random.default_rng(5), 5000, 600)  # far past the arrays' spare ids
        return value

    searcher._top_id = top_id_then_write
    try:
        ranked = db.keyword_ranked(query, 10, bounded=True)  # the query's snapshot: no IndexError
    finally:
        searcher._top_id = top_id
        other.close()
    assert all(i <= last for i, _ in ranked.rows)
    after = db.keyword_ranked("zebra", 50, bounded=True)  # the next query sees them
    assert after.exact and any(i > last for i, _ in after.rows)
    _same(_fts5(db, "zebra", 50), after.rows)


def test_ids_far_beyond_the_row_count_keep_fts5s_query(db, monkeypatch):
    monkeypatch.setattr("llmos.tasks.index_db.BOUNDED_ROWS", 10)
    for d in range(4):  # re-indexed documents get new ids (never reused): the largest id grows past the count
        for again in range(4):
            db.delete(f"doc{d}")
            _write(db, f"doc{d}", np.random.default_rng(d * 10 + again), 0, 100)
    assert db._top_chunk_id() > 4 * db._fts_rows()
    db.keyword("parsing socket", 10)
    assert db._bm25 is None  # arrays indexed by chunk id would be mostly empty: FTS5 ranks


def _statements(db: IndexDB) -> list[str]:
    seen: list[str] = []
    db._db.set_trace_callback(seen.append)
    return seen


def _all_exact(db: IndexDB) -> None:
    for query in QUERIES:
        ranked = db.keyword_ranked(query, 10, bounded=True)
        assert ranked.exact
        _same(_fts5(db, query, 10), ranked.rows)


def test_row_lengths_are_kept_for_the_next_process(db, monkeypatch):
    """The first bounded query reads every row's length from docsize and keeps them beside the index;
    the next IndexDB on the file reads only the rows added since, with the same lists as FTS5."""
    monkeypatch.setattr(bm25, "SAVE_LENGTHS", 1)
    assert not db.lengths_file.exists()
    _all_exact(db)
    assert db.lengths_file.exists() and db.file_size() > db.lengths_file.stat().st_size
    again = IndexDB(db.path)
    seen = _statements(again)
    _all_exact(again)
    assert not [s for s in seen if "_docsize WHERE id >" in s]  # nothing read past the kept rows
    assert [s for s in seen if "_docsize WHERE id IN" in s]  # the check against the database
    _write(again, "doc9", np.random.default_rng(5), 2000, 50)  # rows added since: read by rowid
    third = IndexDB(db.path)
    seen = _statements(third)
    _all_exact(third)
    assert [s for s in seen if "_docsize WHERE id >" in s]
    again.close(), third.close()


def _lengths(db: IndexDB, kept: bool) -> np.ndarray:
    """The rows' lengths a bounded query used: through the index (its kept file when `kept`), or read
    from docsize alone."""
    if kept:
        db.keyword_ranked("parsing files", 10, bounded=True)
        searcher = db._bm25
    else:
        searcher = bm25.BoundedBM25(db._db, "chunks_fts", "porter unicode61 remove_diacritics 2", 2)
        searcher.top(db._query_words("parsing files"), 10)
    return searcher._lengths[:db._top_chunk_id() + 1]


def test_kept_lengths_of_another_index_changed_or_torn_are_not_used(db, tmp_path, monkeypatch):
    """(Wrong lengths would only misorder which rows are scored first, not the scores: checked on the
    lengths themselves.)"""
    monkeypatch.setattr(bm25, "SAVE_LENGTHS", 1)
    _all_exact(db)
    kept = db.lengths_file.read_bytes()
    db.close()
    # Another index at the same path (removed and built again, other text under the same ids).
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"i.sqlite{suffix}").unlink(missing_ok=True)
    other = IndexDB(tmp_path / "i.sqlite")
    rng = np.random.default_rng(8)
    for d in range(4):
        _write(other, f"doc{d}", rng, 100 * d, 100)
    truth = _lengths(other, kept=False)
    other.lengths_file.write_bytes(kept)
    assert not np.array_equal(np.frombuffer(kept[-4 * len(truth):], dtype="<f4"), truth)
    np.testing.assert_array_equal(_lengths(other, kept=True), truth)
    _all_exact(other)
    other.close()
    # This index's own file with its lengths changed (the uid matches: the spot check catches it), or torn.
    good = other.lengths_file.read_bytes()
    header = len(good) - 4 * len(truth)
    changed = (np.frombuffer(good[header:], dtype="<f4") + 1).astype("<f4").tobytes()
    for bad in (good[:header] + changed, good[:len(good) // 2], b"junk", good):
        fresh = IndexDB(tmp_path / "i.sqlite")
        fresh.lengths_file.write_bytes(bad)
        np.testing.assert_array_equal(_lengths(fresh, kept=True), truth)
        fresh.close()


def test_an_index_from_before_uids_gets_one_at_its_next_write(db):
    """Without a uid the lengths are not kept (nothing to check a file against); a write adds one."""
    db._db.execute("DELETE FROM meta WHERE key='uid'")
    older = IndexDB(db.path)
    assert older.meta("uid") is None
    assert bm25.BoundedBM25(older._db, "chunks_fts", "porter unicode61 remove_diacritics 2", 2,
                            older.lengths_file, older.meta("uid"))._saved is None
    _write(older, "doc8", np.random.default_rng(3), 3000, 5)
    uid = older.meta("uid")
    assert uid and len(uid) == 32
    _write(older, "doc9", np.random.default_rng(4), 3100, 5)
    assert older.meta("uid") == uid  # made once
    older.close()
