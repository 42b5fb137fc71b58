"""BM25 top-n over an FTS5 table at a bounded cost, scored exactly as FTS5's bm25() scores.

FTS5's `ORDER BY bm25(t)` ranks every row that holds any query word (most of a large collection for
a query of ordinary words, ~1 us a row) and first counts each word's full doclist for its document
frequency. `BoundedBM25.top` returns FTS5's scores for the rows it returns (FTS5's formula,
recomputed here phrase by phrase in FTS5's order: k1 1.2, b 0.75, idf log((N - n + 0.5) / (n + 0.5))
clamped to 1e-6, instances summed over the columns, the row's length over all columns; equal to
FTS5's to the last bit in the tests), and proves where it can that the list is FTS5's:

- the query's words become FTS5 phrases through the table's own tokenizer (an FTS5 table in memory
  with the same `tokenize=`), so stemming, case, diacritics and `a_b` splitting are FTS5's;
- document frequencies come from an `fts5vocab` table (a term's doclist read without its positions;
  a longer phrase by FTS5's count), kept per phrase while the row count stays within `DF_DRIFT` of
  the count they were read at; N and the average length come from FTS5's totals record each query;
- candidates: every phrase's rows (rowids only, read from FTS5 once and kept in memory, up to
  `CACHED_ROWIDS` of them, least recently used out; rows added since are read on use, by rowid; ids
  of deleted rows only cost a candidate slot). Each row gets BM25 as if it held each of its phrases
  once: its phrases' idf summed, times its length factor (lengths from FTS5's docsize, kept in
  memory, 4 bytes a row; a process's first query reads them, ~1 s at a million rows, and keeps them
  in `lengths_file` beside the index for the next process, which reads only rows added since). A phrase not
  cached is read rarest first while this query's reads stay within `MAX_POSTINGS` rows (the rarest
  always); one in half the rows or more (idf 1e-6) only when the others' rows are too few. The
  `FIRST_SCORED` best rows are scored exactly: their text tokenized as FTS5 does (ASCII split in
  Python, each word mapped through FTS5 once; other text through FTS5 whole);
- the proof (MaxScore's bound): a phrase adds at most idf * (k1 + 1) to a row. If the phrases left
  unread add less than the n-th score found, no row without a read phrase can enter, and the read rows
  whose bound reaches the n-th score are scored too (when at most `MAX_SCORED` in all): the list is
  then FTS5's (`exact`). Otherwise the list is the best of the rows scored, `exact=False`: the budget
  was reached. A query of common words only over a large collection usually ends there.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

K1, B = 1.2, 0.75
DF_DRIFT = 0.01  # cached document frequencies are re-read once the row count moved by more than this share
SMALL_DF = 1_000  # document frequencies below this are re-read on every query (cheap, and a new row may hold the phrase)
MAX_POSTINGS = 300_000  # rows read from FTS5 for phrases not cached, per query (~0.15-0.45 us a row here)
MAX_SCORED = 400  # rows scored exactly, per query (~35 us a row here)
CACHED_ROWIDS = 32_000_000  # rowids of phrases kept between queries (int32: 128 MB at most)
FIRST_SCORED = 200  # rows scored exactly first (those holding the most, by idf, of the read phrases), at least n
_WORDS_CACHED = 50_000  # query word -> FTS5 term(s)
SAVE_LENGTHS = 65_536  # rows' lengths read from docsize in one query past which the lengths file is rewritten


@dataclass(frozen=True)
class Ranked:
    """A keyword list, best first, and whether it is provably FTS5's full ranking (`exact`), with the
    work it took (postings read, rows scored)."""

    rows: list[tuple[int, float]]
    exact: bool
    postings: int
    scored: int


def totals_rows(record: bytes) -> int:
    """The row count in FTS5's totals record (the `_data` row of id 1)."""
    return _varints(record)[0]


def _length(sz: bytes) -> float:
    """A row's length in tokens over its columns: the sum of its docsize record's varints (one byte each below 128)."""
    return float(sz[0] + sz[1]) if len(sz) == 2 and sz[0] < 128 and sz[1] < 128 else float(sum(_varints(sz)))


def _varints(blob: bytes) -> list[int]:
    """SQLite varints (big-endian 7 bits a byte, the 9th byte whole): FTS5's totals and docsize records."""
    out, i = [], 0
    while i < len(blob):
        value = 0
        for j in range(9):
            c = blob[i]
            i += 1
            if j == 8:
                value = (value << 8) | c
                break
            value = (value << 7) | (c & 0x7F)
            if not c & 0x80:
                break
        out.append(value)
    return out


class BoundedBM25:
    """Top-n BM25 over `table` (an FTS5 table of `db`, in schema main), as FTS5's bm25() ranks it."""

    def __init__(self, db: sqlite3.Connection, table: str, tokenize: str, columns: int,
                 lengths_file: Path | None = None, uid: str | None = None) -> None:
        """`lengths_file` (with `uid`, the database's own identifier): where the rows' lengths are kept
        between processes (see `RowLengths`)."""
        self.db, self.table, self.columns = db, table, columns
        self._saved = RowLengths(lengths_file, uid) if lengths_file is not None and uid else None
        db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{table}_rows USING fts5vocab(main, {table}, 'row')")
        # FTS5 tokenizes in memory: query words one a row, and candidate rows' text to count their terms.
        self.mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        cols = ", ".join(f"c{i}" for i in range(columns))
        self.mem.execute(f"CREATE VIRTUAL TABLE t USING fts5({cols}, tokenize={tokenize!r}, content='')")
        self.mem.execute("CREATE VIRTUAL TABLE ti USING fts5vocab(t, 'instance')")
        self._terms: dict[str, tuple[str, ...]] = {}
        self._df: dict[tuple[str, ...], tuple[int, int]] = {}  # phrase -> (rows holding it, the row count when read)
        self._words: dict[tuple[str, ...], str] = {}  # this query's phrases -> a word of the query that makes each
        # phrase -> (its rowids, int32 ascending; the largest rowid when read; the row count when read)
        self._rowids: dict[tuple[str, ...], tuple[np.ndarray, int, int]] = {}
        self._cached_total = 0
        self._est: np.ndarray | None = None
        self._lengths: np.ndarray | None = None  # per rowid: the row's length in tokens (FTS5's docsize)
        self._lengths_last = 0

    # --- statistics -------------------------------------------------------------------------------

    def close(self) -> None:
        self.mem.close()

    def totals(self) -> tuple[int, float]:
        """(rows, average row length in tokens over all columns), from FTS5's totals record."""
        row = self.db.execute(f"SELECT block FROM {self.table}_data WHERE id=1").fetchone()
        values = _varints(row[0]) if row and row[0] else [0]
        rows, tokens = values[0], sum(values[1:1 + self.columns])
        return rows, (tokens / rows if rows else 0.0)

    def terms(self, words: list[str]) -> list[tuple[str, ...]]:
        """Each word as FTS5's tokenizer makes it: a tuple of terms (empty, one, or several)."""
        missing = [w for w in dict.fromkeys(words) if w not in self._terms]
        if missing:  # (the cache is emptied between queries, in `top`: callers index it after this call)
            self.mem.execute("BEGIN")
            self.mem.executemany("INSERT INTO t(rowid, c0) VALUES (?, ?)", enumerate(missing))
            found: dict[int, list[tuple[int, str]]] = {}
            for doc, term, offset in self.mem.execute("SELECT doc, term, offset FROM ti"):
                found.setdefault(doc, []).append((offset, term))
            self.mem.execute("INSERT INTO t(t) VALUES ('delete-all')")
            self.mem.execute("COMMIT")
            for i, w in enumerate(missing):
                self._terms[w] = tuple(term for _, term in sorted(found.get(i, [])))
        return [self._terms[w] for w in words]

    def df(self, phrase: tuple[str, ...], rows: int) -> int:
        """Rows holding the phrase, read again once the row count moved past DF_DRIFT since it was read:
        a term's from fts5vocab, a longer phrase's by FTS5's count of its matches."""
        cached = self._df.get(phrase)
        # A rare phrase is read every time (a short doclist; a new row holding it must be found).
        if cached is not None and cached[0] >= SMALL_DF and abs(rows - cached[1]) <= DF_DRIFT * cached[1]:
            return cached[0]
        if not phrase:
            count = 0
        elif len(phrase) == 1:
            row = self.db.execute(f"SELECT doc FROM temp.{self.table}_rows WHERE term=?", phrase).fetchone()
            count = row[0] if row else 0
        else:
            match = '"' + self._words[phrase] + '"'
            count = self.db.execute(f"SELECT count(*) FROM {self.table} WHERE {self.table} MATCH ?", (match,)).fetchone()[0]
        if len(self._df) > _WORDS_CACHED:
            self._df.clear()
        self._df[phrase] = (count, rows)
        return count

    # --- ranking ----------------------------------------------------------------------------------

    def column_terms(self, rows: list[tuple]) -> dict[int, list[list[str]]]:
        """rowid -> each column's FTS5 terms in order, for rows (rowid, column texts...). ASCII text is
        split as unicode61 splits it (runs of letters and digits) and each word mapped through
        FTS5 (`terms`, cached); any other text goes through FTS5 whole."""
        out: dict[int, list[list[str]]] = {}
        other = []
        for row in rows:
            if all(c is None or c.isascii() for c in row[1:]):
                cols = [c.lower().translate(_NOT_WORD).split() if c else [] for c in row[1:]]
                words = [w for col in cols for w in col]
                if any(w not in self._terms for w in words):
                    self.terms(words)
                t = self._terms
                out[row[0]] = [[term for w in col for term in t[w]] for col in cols]
            else:
                other.append(row)
        if other:
            names = ", ".join(f"c{i}" for i in range(self.columns))
            self.mem.execute("BEGIN")
            self.mem.executemany(f"INSERT INTO t(rowid, {names}) VALUES ({', '.join('?' * (self.columns + 1))})", other)
            found: dict[int, list[list[tuple[int, str]]]] = {r[0]: [[] for _ in range(self.columns)] for r in other}
            for doc, term, col, offset in self.mem.execute("SELECT doc, term, col, offset FROM ti"):
                found[doc][int(col[1:])].append((offset, term))
            self.mem.execute("INSERT INTO t(t) VALUES ('delete-all')")
            self.mem.execute("COMMIT")
            for doc, cols in found.items():
                out[doc] = [[term for _, term in sorted(col)] for col in cols]
        return out

    # --- ranking ----------------------------------------------------------------------------------

    def top(self, words: list[str], n: int, max_postings: int = MAX_POSTINGS, max_scored: int = MAX_SCORED,
            first: int = FIRST_SCORED) -> Ranked:
        """The n best rows for the phrases `words` (the MATCH `"w1" OR "w2" ...`, in this order) by
        FTS5's BM25, best first, at a bounded cost (see the module docstring)."""
        if len(self._terms) > _WORDS_CACHED:
            self._terms.clear()
        # One read transaction: every statement of the query sees the same snapshot of the index, so a
        # writer in another process cannot add rowids past the arrays sized here.
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN")
        try:
            return self._top(words, n, max_postings, max_scored, first)
        finally:
            if own:
                self.db.execute("COMMIT")

    def _top(self, words: list[str], n: int, max_postings: int, max_scored: int, first: int) -> Ranked:
        phrases = self.terms(words)
        # FTS5 would stem a term again: a phrase is looked up by a word that makes it.
        self._words = {p: w for p, w in zip(phrases, words)}
        rows, avgdl = self.totals()
        if rows == 0:
            return Ranked([], True, 0, 0)
        counts, fresh = {}, True  # fresh: every df read at this row count (a drifted one is not FTS5's)
        for p in dict.fromkeys(phrases):
            counts[p] = self.df(p, rows)
            fresh = fresh and self._df[p][1] == rows
        # FTS5 gives each phrase of the query its own idf, a phrase of no terms matches nothing.
        idf = [max(math.log((rows - counts[p] + 0.5) / (counts[p] + 0.5)), 0.0) or 1e-6 for p in phrases]
        weight: dict[tuple[str, ...], float] = {}  # a repeated phrase counts as often as FTS5 counts it
        for p, w in zip(phrases, idf):
            weight[p] = weight.get(p, 0.0) + w
        present = sorted((p for p in weight if counts[p] > 0), key=lambda p: counts[p])  # rarest first
        if not present:
            return Ranked([], True, 0, 0)
        # Every phrase's rows, rarest first, from the cache or read from FTS5 within the budget.
        top_id = self._top_id()
        if self._est is None or len(self._est) <= top_id:
            self._est = np.zeros(top_id + 1 + (top_id >> 4), dtype=np.float32)
        est = self._est  # per rowid: the summed idf of the read phrases it holds
        est.fill(0.0)
        postings, read = 0, []

        def gather(group: list[tuple[str, ...]]) -> int:
            added = 0
            for p in group:
                docs = self._cached(p, rows, top_id)
                if docs is None:
                    if read and postings + added + counts[p] > max_postings:
                        continue  # left unread this time (its bound is counted below)
                    docs = self._read(p, rows, top_id)
                    added += len(docs)
                est[docs] += weight[p]
                read.append(p)
            return added

        # A phrase in half the rows or more has FTS5's idf 1e-6: many rows, nothing added to the sums.
        # Read only when the others' rows are too few for the list.
        common = [p for p in present if weight[p] < 1e-5]
        telling = [p for p in present if weight[p] >= 1e-5]
        postings += gather(telling or common)
        factor = self._length_factor(top_id, len(est), avgdl)
        est *= factor  # BM25 at one instance a phrase: the idf sum * (k1 + 1) / (1 + k1 (1 - b + b D / avgdl))
        # Score exactly the rows holding the most (by idf) of the read phrases. A row scores at most
        # (k1 + 1) * its read phrases' idf + `unread`: when no row left out can reach the n-th score
        # (or those that can are few enough to score too), the list is FTS5's.
        scorer = _Scorer(self, phrases, idf, avgdl)
        scored: dict[int, float] = {}
        for _ in range(2):
            pick = _best(est, max(first, n) + len(scored))
            pick = [int(i) for i in pick if est[i] > 0 and int(i) not in scored][:max(first, n)]
            scored.update(scorer.score(pick))
            theta = _nth(scored, n)
            if theta is not None or not telling or not common:
                break
            before = est.copy()
            est.fill(0.0)
            postings += gather(common)
            est *= factor
            est += before
            telling = []
        unread = sum(weight[p] for p in present if p not in read) * (K1 + 1)  # the most they add to any row
        proven = fresh and (theta is not None and unread < theta or len(read) == len(present))
        if proven:
            # est / factor is a row's idf sum over the read phrases; each adds at most idf * (k1 + 1).
            need = 0.0 if theta is None else (theta - unread) / (K1 + 1)
            reach = np.flatnonzero((est > 0) & (est >= need * factor * (1 - 1e-5) - 1e-6))  # est is float32
            todo = [int(i) for i in reach if int(i) not in scored] if len(reach) <= max_scored else reach
            if len(scored) + len(todo) <= max_scored:
                scored.update(scorer.score([int(i) for i in todo]))
            else:
                proven = False
        best = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return Ranked(best, proven, postings, len(scored))

    def _length_factor(self, top_id: int, size: int, avgdl: float) -> np.ndarray:
        """Per rowid below `size` (> top_id): (k1 + 1) / (1 + k1 (1 - b + b D / avgdl)), D the row's
        length in tokens from FTS5's docsize (kept in memory, 4 bytes a row; rows added since are
        read by rowid)."""
        if self._lengths is None and self._saved is not None:
            loaded = self._saved.load(self._docsize)
            if loaded is not None:
                self._lengths, self._lengths_last = loaded, len(loaded) - 1
        if self._lengths is None or len(self._lengths) < size:
            grown = np.zeros(size, dtype=np.float32)
            if self._lengths is not None:
                grown[:len(self._lengths)] = self._lengths
            self._lengths = grown
        lengths, start = self._lengths, self._lengths_last
        while self._lengths_last < top_id:
            block = self.db.execute(f"SELECT id, sz FROM {self.table}_docsize WHERE id > ? ORDER BY id LIMIT 65536",
                                    (self._lengths_last,)).fetchall()
            if not block:
                break
            for i, sz in block:
                lengths[i] = _length(sz)
            self._lengths_last = block[-1][0]
        if self._saved is not None and self._lengths_last - start >= SAVE_LENGTHS:
            self._saved.save(lengths[:self._lengths_last + 1])
        return (K1 + 1) / (1 + K1 * (1 - B + (B / avgdl) * lengths[:size]))

    def _docsize(self, ids: list[int]) -> dict[int, float]:
        """Rows' lengths read from FTS5's docsize, by rowid (those present)."""
        marks = ",".join("?" * len(ids))
        return {i: _length(sz) for i, sz in self.db.execute(f"SELECT id, sz FROM {self.table}_docsize WHERE id IN ({marks})", ids)}

    def _top_id(self) -> int:
        row = self.db.execute(f"SELECT max(id) FROM {self.table}_content").fetchone()
        return int(row[0] or 0)

    def _cached(self, phrase: tuple[str, ...], rows: int, top_id: int) -> np.ndarray | None:
        """The phrase's rowids from the cache, with rows added since read appended (ids only grow:
        chunk ids are never reused); None when not cached or too many rows went since (deleted ids
        kept in a list only cost a candidate slot: scoring skips rows that are gone)."""
        entry = self._rowids.pop(phrase, None)
        if entry is None:
            return None
        docs, last, at_rows = entry
        if rows < at_rows * (1 - DF_DRIFT):
            self._cached_total -= len(docs)
            return None
        if top_id > last:
            more = self._fetch(phrase, last)
            docs = np.concatenate([docs, more]) if len(more) else docs
            self._cached_total += len(more)
        self._rowids[phrase] = (docs, top_id, max(rows, at_rows))  # most recently used last
        return docs

    def _read(self, phrase: tuple[str, ...], rows: int, top_id: int) -> np.ndarray:
        docs = self._fetch(phrase, 0)
        self._rowids[phrase] = (docs, top_id, rows)
        self._cached_total += len(docs)
        while self._cached_total > CACHED_ROWIDS and len(self._rowids) > 1:  # least recently used out
            old = next(iter(self._rowids))
            self._cached_total -= len(self._rowids.pop(old)[0])
        return docs

    def _fetch(self, phrase: tuple[str, ...], after: int) -> np.ndarray:
        """The rowids (ascending) above `after` of the rows holding the phrase."""
        match = '"' + self._words[phrase] + '"'
        text = self.db.execute(f"SELECT group_concat(rowid) FROM (SELECT rowid FROM {self.table} WHERE {self.table} MATCH ?"
                               " AND rowid > ? ORDER BY rowid)", (match, after)).fetchone()[0]
        return np.fromstring(text, dtype=np.int32, sep=",") if text else np.zeros(0, dtype=np.int32)


# unicode61's tokens in ASCII text (lowercased) are its runs of letters and digits: every other ASCII
# character becomes a space and the text is split there.
_NOT_WORD = str.maketrans({c: " " for c in map(chr, range(128)) if not (c.isascii() and (c.islower() or c.isdigit()))})


def _best(values: np.ndarray, m: int) -> np.ndarray:
    """Positions of the m largest values, largest first (ties at the cut: as argpartition leaves them,
    the same for the same values). A large array is cut first at a value a sample puts a little
    below the m-th (argpartition over a million rows costs ~10 ms; the cut, ~2)."""
    if len(values) > 64 * m:
        sample = values[np.random.default_rng(0).integers(0, len(values), 16384)]
        cut = np.partition(sample, len(sample) - 1 - min(len(sample) - 1, 4 * m * len(sample) // len(values) + 8))
        cut = cut[len(sample) - 1 - min(len(sample) - 1, 4 * m * len(sample) // len(values) + 8)]
        above = np.flatnonzero(values >= cut)
        if len(above) >= m:
            part = above[np.argpartition(-values[above], m - 1)[:m]] if len(above) > m else above
            return part[np.lexsort((part, -values[part]))]
    part = np.argpartition(-values, m - 1)[:m] if len(values) > m else np.arange(len(values))
    return part[np.lexsort((part, -values[part]))]


def _nth(scored: dict[int, float], n: int) -> float | None:
    """The n-th best score so far (None before n rows are scored)."""
    if len(scored) < n:
        return None
    return heapq.nlargest(n, scored.values())[-1]


class _Scorer:
    """Exact BM25 of given rows, as FTS5 computes it: the rows' columns tokenized as FTS5 does
    (`BoundedBM25.column_terms`), phrase instances counted over the columns, the row's length the
    sum of its columns' token counts (FTS5's docsize), the phrases summed in the query's order."""

    def __init__(self, owner: BoundedBM25, phrases: list[tuple[str, ...]], idf: list[float], avgdl: float) -> None:
        self.owner, self.phrases, self.idf, self.avgdl = owner, phrases, idf, avgdl
        self.single = all(len(p) == 1 for p in phrases)
        self.wanted = {p[0] for p in phrases if len(p) == 1}

    def score(self, ids: list[int]) -> dict[int, float]:
        if not ids:
            return {}
        o = self.owner
        cols = ", ".join(f"c{i}" for i in range(o.columns))
        content = o.db.execute(f"SELECT id, {cols} FROM {o.table}_content WHERE id IN (SELECT value FROM json_each(?))",
                               (json.dumps(ids),)).fetchall()
        out = {}
        for i, d, freq in self._counts(content):
            score = 0.0
            for phrase, idf in zip(self.phrases, self.idf):  # FTS5's sum, phrase by phrase, in its order
                f = float(freq.get(phrase, 0))
                score += idf * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * d / self.avgdl)))
            out[i] = score
        return out

    def _counts(self, content: list[tuple]) -> Iterator[tuple[int, float, dict[tuple[str, ...], int]]]:
        """(rowid, length in tokens, phrase -> instances) of each row."""
        o = self.owner
        fast = [r for r in content if self.single and all(c is None or c.isascii() for c in r[1:])]
        if fast:
            words = {r[0]: " ".join(c for c in r[1:] if c).lower().translate(_NOT_WORD).split() for r in fast}
            distinct = {i: set(w) for i, w in words.items()}
            seen = set().union(*distinct.values())
            new = seen.difference(o._terms)
            if new:
                o.terms(list(new))
            terms, wanted = o._terms, self.wanted
            # One term a word (ASCII runs of letters and digits are single tokens): the words of these
            # rows that make a query term, looked up once, then counted row by row.
            hits = {w: t for w in seen if (t := terms[w])[0] in wanted}
            for i, row in words.items():
                freq: dict[tuple[str, ...], int] = {}
                for w in distinct[i].intersection(hits):
                    t = hits[w]
                    freq[t] = freq.get(t, 0) + row.count(w)
                yield i, float(len(row)), freq
        rest = [r for r in content if not (self.single and all(c is None or c.isascii() for c in r[1:]))]
        for i, columns in o.column_terms(rest).items() if rest else ():
            freq = {p: sum(_count(c, p) for c in columns) for p in dict.fromkeys(self.phrases)}
            yield i, float(sum(len(c) for c in columns)), freq


def _count(terms: list[str], phrase: tuple[str, ...]) -> int:
    """Instances of the phrase (its terms at consecutive positions) in one column."""
    if not phrase:
        return 0
    if len(phrase) == 1:
        return terms.count(phrase[0])
    m = len(phrase)
    return sum(1 for i in range(len(terms) - m + 1) if terms[i] == phrase[0] and tuple(terms[i:i + m]) == phrase)


class RowLengths:
    """Rows' lengths (FTS5's docsize, per rowid up to the largest read) kept in a file beside the
    index, so that a new process (each `llmos search` from a shell) does not read a million docsize
    records (~1 s) before its first query. The index never reuses a rowid and a row's text never
    changes under its rowid, so lengths once read stay true; what the file holds is checked against
    the database before use: the index's own identifier (`uid`, made when the index was), then the
    lengths of up to 16 rows spread over the file read again from docsize. A file that fails a check,
    is torn or will not read is ignored (and rewritten at the next save); saving writes a new file and
    renames it over the old, so a crash leaves the old file or the new one."""

    MAGIC = b"llmos-bm25-lengths\x01\n"
    CHECKED = 16

    def __init__(self, path: Path, uid: str) -> None:
        self.path = path
        self._prefix = self.MAGIC + struct.pack("<H", len(uid)) + uid.encode()  # then the row count, then the lengths

    def _header(self, rows: int) -> bytes:
        return self._prefix + struct.pack("<q", rows)

    def load(self, docsize) -> np.ndarray | None:
        """The kept lengths (float32, rowid 0 .. the largest kept), or None; `docsize(ids)` reads rows'
        lengths from the database for the check."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        head = self._prefix
        if not data.startswith(head) or len(data) < len(head) + 8:
            return None
        (rows,) = struct.unpack_from("<q", data, len(head))
        body = memoryview(data)[len(head) + 8:]
        if rows < 1 or len(body) != rows * 4:
            return None
        lengths = np.frombuffer(body, dtype="<f4").astype(np.float32)
        picks = np.unique(np.linspace(1, rows - 1, self.CHECKED).astype(np.int64)).tolist()
        found = docsize(picks)
        if not found or any(lengths[i] != v for i, v in found.items()):
            return None
        return lengths

    def save(self, lengths: np.ndarray) -> None:
        """Write `lengths` (rowid 0 .. len - 1) as the kept file; an unwritable place only costs the next
        process its reads."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(self._header(len(lengths)))
                f.write(np.ascontiguousarray(lengths, dtype="<f4").tobytes())
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
