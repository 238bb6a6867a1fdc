"""Exact k-NN over an exact-only collection's vectors held in memory, as matrix products.

Why: an exact-only collection (the evaluator's per-run collections) is never indexed, so every
query on Qdrant Edge is a brute-force scan, and the Edge binding runs it on one core *with the GIL
held*: 8,677 leave-one-out queries over 8,677 x 1280-d points took 7.2 s of one core, during which
no other thread of the service (health checks included) ran between calls. The same scan as one
BLAS matrix product per block of queries uses every core and releases the GIL (numpy's matmul and
argpartition both do): about 2 s on 2 cores (measured, ``benchmarks/evaluator.py``).

Edge stays the store of record (durability, payloads, filters, restarts); this is a copy of the
vectors, kept in step with every write under the collection's write lock and rebuilt from Edge
after a restart. It answers what it can answer exactly as Edge would (cosine on vectors normalised
as Qdrant normalises them, every point scored): queries without a payload filter. Filtered queries
still go to Edge.

Memory: ``4 x dim`` bytes per point beside Edge's own copy; ``max_bytes`` bounds it (a collection
that grows past it is dropped from memory and searched on Edge again).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Scores computed per block of queries: blocks x points x 4 bytes (64 MB), so that a large batch
# never holds a (queries x points) matrix at once.
BLOCK_SCORES = 16_000_000


@dataclass(frozen=True)
class ScanHits:
    """One query's hits, best first: point ids (object array of str), cosine scores (float32), and
    the stored (normalised) vectors when asked for, (hits, dim) float32."""

    ids: np.ndarray
    scores: np.ndarray
    vectors: np.ndarray | None = None


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as Qdrant does for cosine (a zero row is left as it is)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=vectors.copy(), where=norms > np.finfo(np.float32).eps)


class ExactScan:
    """The points of one collection as a dense float32 matrix (row per point) and their ids.

    Thread-safe: one lock orders writes and searches (a search computes outside the GIL, not outside
    the lock), so a search sees every write acknowledged before it started and none half-applied.
    """

    def __init__(self, dim: int, max_bytes: int) -> None:
        self.dim = dim
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._matrix = np.empty((0, dim), dtype=np.float32)
        self._ids = np.empty(0, dtype=object)
        self._rows: dict[str, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def fits(self, points: int) -> bool:
        """Whether ``points`` points stay within ``max_bytes``."""
        return points * self.dim * 4 <= self.max_bytes

    # -- writes (the caller holds the collection's write lock and has written to Edge first) -------

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> bool:
        """Adds or replaces points; False (nothing changed) when they would not fit in ``max_bytes``."""
        vectors = normalise(vectors)
        with self._lock:
            new = [pid for pid in dict.fromkeys(ids) if pid not in self._rows]
            if not self.fits(self._count + len(new)):
                return False
            self._reserve(self._count + len(new))
            for pid, vector in zip(ids, vectors, strict=True):
                row = self._rows.get(pid)
                if row is None:
                    row = self._rows[pid] = self._count
                    self._ids[row] = pid
                    self._count += 1
                self._matrix[row] = vector
            return True

    def delete(self, ids: Sequence[str]) -> int:
        """Removes points (unknown ids are ignored); the last row moves into each freed one. Returns
        how many were removed."""
        removed = 0
        with self._lock:
            for pid in ids:
                row = self._rows.pop(pid, None)
                if row is None:
                    continue
                last = self._count - 1
                if row != last:
                    moved = self._ids[last]
                    self._matrix[row] = self._matrix[last]
                    self._ids[row] = moved
                    self._rows[moved] = row
                self._ids[last] = None
                self._count = last
                removed += 1
        return removed

    def _reserve(self, points: int) -> None:
        if points <= len(self._matrix):
            return
        capacity = max(points, min(2 * len(self._matrix), self.max_bytes // (4 * self.dim)), 64)
        matrix = np.empty((capacity, self.dim), dtype=np.float32)
        matrix[: self._count] = self._matrix[: self._count]
        ids = np.empty(capacity, dtype=object)
        ids[: self._count] = self._ids[: self._count]
        self._matrix, self._ids = matrix, ids

    # -- reads -------------------------------------------------------------------------------------

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored (normalised) vectors of the ``ids`` that exist."""
        with self._lock:
            return {pid: self._matrix[self._rows[pid]].copy() for pid in ids if pid in self._rows}

    def search(self, queries: np.ndarray, limits: Sequence[int], exclude: Sequence[Sequence[str]] | None = None,
               with_vectors: bool = False) -> list[ScanHits]:
        """The ``limits[i]`` points most similar to ``queries[i]`` (cosine), best first.

        Args:
            queries: (q, dim) float32, any non-zero norm (normalised here, as Qdrant does).
            limits: hits per query (fewer when the collection has fewer points).
            exclude: per query, ids that must not be among its hits (unknown ids are ignored).
            with_vectors: also return each hit's stored vector.
        """
        queries = normalise(queries)
        out: list[ScanHits] = []
        with self._lock:
            n = self._count
            matrix, ids = self._matrix[:n], self._ids[:n]
            block = max(1, BLOCK_SCORES // max(1, n))
            for start in range(0, len(queries), block):
                stop = min(start + block, len(queries))
                scores = queries[start:stop] @ matrix.T  # BLAS, without the GIL
                kept = []
                for i in range(start, stop):
                    rows = sorted({self._rows[pid] for pid in exclude[i] if pid in self._rows}) if exclude else []
                    scores[i - start, rows] = -np.inf  # ranked last, and cut below
                    kept.append(max(0, min(limits[i], n - len(rows))))
                top = _ranked(scores, max(kept, default=0))
                for row, keep in enumerate(kept):
                    hits = top[row, :keep]
                    out.append(ScanHits(ids[hits], scores[row, hits], matrix[hits].copy() if with_vectors else None))
        return out


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores``, the columns of its ``k`` largest values, largest first ((rows, k) int)."""
    n = scores.shape[1]
    if k <= 0:
        return np.empty((len(scores), 0), dtype=np.int64)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(scores), 1))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)
