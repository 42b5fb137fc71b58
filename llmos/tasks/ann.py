"""The HNSW graph beside an index (tasks/index.py): approximate nearest neighbours at any size.

`PATH.usearch/` holds usearch HNSW segments of at most SEGMENT_SIZE vectors each, and
`manifest.json` naming them with the index generation they match (-1: not known to match). The
graph proposes candidates; `Index` reranks them by the exact fp32 vectors in the database. So the
graph keeps its vectors as int8 (a quarter of fp32; insertion ~4x faster than fp32 here): on 60k
synthetic clustered vectors, recall@10 against exact search was 0.93 from int8 distances alone and
1.0 with 40 candidates reranked; on 40k vectors made of real MiniLM ones, int8, fp16 and fp32
graphs all gave 0.96 at expansion_search 128 and more candidates did not help (the misses are the
graph's, not int8's: see the settings below). The database is not held twice in fp32.

Why segments: a usearch graph grows in memory only, so one graph of a million chunks would make
every `index add` load ~550 MB. Here adding loads the open segment (the last, not yet full); full
segments stay memory-mapped read-only (usearch views) and are loaded one at a time only to remove
chunks from them. Search asks every segment and merges their candidates.

Saving is atomic: changed segments are written under new file names, the manifest is replaced (the
commit point), then files it no longer names are deleted. A crash before the manifest leaves the
previous graph, which `Index` heals from the database (the generations differ). A segment file that
will not open is left out and the generation set to -1, so the heal puts its chunks back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmos.errors import LlmosError
from llmos.files import commit, write_atomically

FORMAT = 2
SEGMENT_SIZE = 262_144  # vectors per segment: ~165 MB (630 bytes a vector) while it is the one added to
# Graph settings, measured by bench/search.py (recall@10 against exact search after the rerank):
# 300k chunks whose vectors are spread as real passages' (mean pairwise cosine 0.14): 0.988 with
# 32/128/256. On a far more crowded set (cosine 0.59; 40k): 16/64 gave 0.96 at expansion_search 128,
# 0.988 at 256, 0.996 at 512, and 32/128 0.995 at 256 (1.5x the search time); at 300k of that set
# 16/64/256 fell to 0.85 (0.94 at 1024), hence 32/128: inserts take ~2x longer than 16/64's.
CONNECTIVITY = 32
EXPANSION_ADD = 128
EXPANSION_SEARCH = 256


def _usearch() -> Any:
    try:
        from usearch.index import Index as USearchIndex
    except ImportError:
        raise LlmosError("approximate search needs usearch, a dependency of llmos that is missing here: pip install usearch") from None
    return USearchIndex


@dataclass
class _Segment:
    file: str  # name inside the folder; "" until first saved
    index: Any  # a usearch Index: loaded when `writable`, else a read-only view, or None until needed
    writable: bool
    count: int = 0  # vectors in it as last saved or loaded (pending `removed` still counted)
    dirty: bool = False
    removed: list[np.ndarray] = field(default_factory=list)  # ids to drop from a view when it is next saved


class AnnGraph:
    """Segments of an HNSW graph over (chunk id, unit vector) pairs. `generation` is the index
    generation the graph matches, -1 when unknown; the caller keeps it true."""

    def __init__(self, folder: Path, dim: int) -> None:
        self.folder = folder
        self.dim = dim
        self.generation = -1
        self.saved_generation = -1  # what the manifest on disk says
        self._segments: list[_Segment] = []
        self._next_file = 0

    @classmethod
    def open(cls, folder: Path, dim: int) -> AnnGraph:
        """The graph saved in `folder`, its segments memory-mapped; an empty one (generation -1) when
        there is none or it is unreadable. An older llmos's single-file graph there is removed."""
        graph = cls(folder, dim)
        if folder.is_file():  # llmos before segments: PATH.usearch was one graph file (+ .json)
            folder.unlink()
            Path(f"{folder}.json").unlink(missing_ok=True)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return graph
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("dim") != dim:
            return graph
        graph._next_file = int(manifest.get("next_file", 0))
        complete = True
        for entry in manifest.get("segments", []):
            # The header only: mapping a segment reads all of it (usearch walks every node), and
            # adding needs none but the open one. Segments are fsynced before the manifest names them.
            segment = _Segment(str(entry.get("file")), None, writable=False, count=int(entry.get("count", -1)))
            try:
                header = _usearch().metadata(str(folder / segment.file))
            except Exception:  # a missing or foreign file: leave it out, the heal puts its chunks back
                header = {}
            if header.get("dimensions") != dim or header.get("count_present") != segment.count:
                complete = False
                continue
            graph._segments.append(segment)
        graph.generation = graph.saved_generation = int(manifest.get("generation", -1)) if complete else -1
        return graph

    def __len__(self) -> int:
        return sum(s.count for s in self._segments)

    def _index(self, segment: _Segment) -> Any:
        """The segment's usearch index, memory-mapped on first use."""
        if segment.index is None:
            self._map(segment)
        return segment.index

    def keys(self) -> np.ndarray:
        """Every chunk id in the graph (8 bytes each: the only part of it held whole)."""
        parts = []
        for segment in self._segments:
            if segment.count:
                keys = np.asarray(self._index(segment).keys, dtype=np.int64)
                parts.append(np.setdiff1d(keys, np.concatenate(segment.removed)) if segment.removed else keys)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _new_index(self) -> Any:
        return _usearch()(ndim=self.dim, metric="ip", dtype="i8", connectivity=CONNECTIVITY,
                          expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)

    def _writable(self, segment: _Segment) -> Any:
        if not segment.writable:
            index = self._new_index()
            index.load(str(self.folder / segment.file))
            segment.index, segment.writable = index, True
        return segment.index

    def add(self, ids: np.ndarray, vectors: np.ndarray, threads: int = 1) -> None:
        """Insert (N,) ids with their (N, D) unit vectors into the open segment, opening new ones as
        segments fill. A full segment stays in memory until `save`."""
        start = 0
        while start < len(ids):
            last = self._segments[-1] if self._segments else None
            if last is None or self._capacity(last) == 0:
                last = _Segment("", self._new_index(), writable=True)
                self._segments.append(last)
            take = min(self._capacity(last), len(ids) - start)
            index = self._writable(last)
            index.add(ids[start:start + take], np.ascontiguousarray(vectors[start:start + take]), threads=threads)
            last.count, last.dirty = len(index), True
            start += take

    @staticmethod
    def _capacity(segment: _Segment) -> int:
        return SEGMENT_SIZE - segment.count

    def remove(self, ids: np.ndarray | list[int]) -> None:
        """Drop these ids wherever they are (ids not in the graph are ignored). From a full segment
        they are dropped when it is saved, one segment loaded at a time; meanwhile search may still
        propose them, and the caller's rerank finds no vector for them (chunk ids are not reused)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        for segment in self._segments:
            present = ids[np.asarray(self._index(segment).contains(ids), dtype=bool)] if segment.count else ids[:0]
            if not len(present):
                continue
            if segment.writable:
                segment.index.remove(present)
                segment.count = len(segment.index)
            else:
                segment.removed.append(present)
            segment.dirty = True

    def dirty(self) -> bool:
        """Changed, or matching another generation, since the last `save`."""
        return self.saved_generation != self.generation or any(s.dirty for s in self._segments)

    def full_unsaved(self) -> bool:
        """A filled segment is still held in memory: time to `save`."""
        return any(s.dirty and self._capacity(s) == 0 for s in self._segments)

    def search(self, queries: np.ndarray, n: int) -> list[np.ndarray]:
        """Up to n candidate ids per (Q, D) query, nearest first by the graph's int8 distances."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        keys, dists = [], []
        for segment in self._segments:
            if not segment.count:
                continue
            m = self._index(segment).search(queries, n, threads=1)
            k, d = np.atleast_2d(m.keys), np.atleast_2d(m.distances)
            # One query gives a `Matches` (no counts), several a `BatchMatches`.
            counts = np.atleast_1d(m.counts) if hasattr(m, "counts") else np.array([len(m.keys)])
            valid = np.arange(k.shape[1])[None, :] < counts[:, None]
            keys.append(k.astype(np.int64))
            dists.append(np.where(valid, d, np.inf))
        if not keys:
            return [np.zeros(0, dtype=np.int64) for _ in queries]
        k, d = np.concatenate(keys, axis=1), np.concatenate(dists, axis=1)  # (Q, segments * n)
        order = np.argsort(d, axis=1, kind="stable")[:, :n]
        return [k[q, order[q]][np.isfinite(d[q, order[q]])] for q in range(len(queries))]

    def save(self, generation: int) -> None:
        """Write the changed segments and then the manifest, atomically; `generation` is what the
        graph now matches (-1 to keep the work of an unfinished heal). Filled segments become
        memory-mapped views again, so memory stays at about one segment."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # Loaded segments first, so that a view loaded to drop removed ids is the only other one in memory.
        for segment in sorted(self._segments, key=lambda s: not s.writable):
            if not segment.dirty:
                continue
            if segment.removed:
                self._writable(segment).remove(np.concatenate(segment.removed))
                segment.removed = []
            name = f"seg-{self._next_file:06d}.usearch"
            self._next_file += 1
            tmp = self.folder / f"{name}.tmp"
            segment.index.save(str(tmp))
            commit(tmp, self.folder / name)  # on disk before the manifest names it
            segment.file, segment.count, segment.dirty = name, len(segment.index), False
            if segment is not self._segments[-1] or self._capacity(segment) == 0:
                segment.index, segment.writable = None, False  # hold only the open segment in memory
        self._segments = [s for s in self._segments if s.count or s is self._segments[-1]]  # emptied by removals
        manifest = {"format": FORMAT, "dim": self.dim, "generation": generation, "next_file": self._next_file,
                    "segments": [{"file": s.file, "count": s.count} for s in self._segments]}
        write_atomically(self.folder / "manifest.json", json.dumps(manifest))
        self.generation = self.saved_generation = generation
        named = {s.file for s in self._segments}
        for stale in self.folder.glob("seg-*.usearch*"):  # replaced, or orphaned by a crash mid-save
            if stale.name not in named:
                stale.unlink(missing_ok=True)

    def release(self) -> None:
        """Unload and unmap every saved segment (after adding: neither the open one nor those mapped
        to find removed ids need stay); search maps them again on first use."""
        for segment in self._segments:
            if segment.file and not segment.dirty:
                segment.index, segment.writable = None, False

    def _map(self, segment: _Segment) -> None:
        view = _usearch().restore(str(self.folder / segment.file), view=True)
        if view is None:
            raise LlmosError(f"{self.folder / segment.file} is not a usearch graph")
        view.expansion_search = EXPANSION_SEARCH
        segment.index, segment.writable = view, False
