"""Exact-only collections answered by the in-memory scan (services.search.exact_scan) give Qdrant
Edge's answers: the same hits in the same order (up to float rounding between near-equal scores),
through writes, deletes, exclusions, payloads, vectors, a restart and the memory bound.

Before: every query on an exact-only collection was Edge's one-core scan with the GIL held (issue
10: the leave-one-out query stage of Caltech-101 took 11 s, of which 7.2 s in Edge).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from services.common.ids import point_id
from services.search.edge_store import EdgeStore
from services.search.exact_scan import ExactScan, normalise
from services.search.store import CollectionMeta, Filter, Hit, Query
from tests.search.conftest import clustered, make_points

DIM = 16


def same_hits(ours: list[Hit], edge: list[Hit], tolerance: float = 1e-5) -> None:
    """Equal scores position by position, and equal ids wherever the scores are not a near-tie."""
    assert len(ours) == len(edge)
    np.testing.assert_allclose([h.score for h in ours], [h.score for h in edge], atol=tolerance)
    scores = np.array([h.score for h in edge])
    for i, (a, b) in enumerate(zip(ours, edge, strict=True)):
        tied = np.abs(scores - scores[i]) < tolerance
        if tied.sum() == 1:
            assert a.id == b.id, f"hit {i}: {a.id} against Edge's {b.id}"
        else:  # near-equal scores may come in either order: same set of ids among them
            assert a.id in {edge[j].id for j in np.flatnonzero(tied)}


def stores(tmp_path: Path, max_bytes: int = 1 << 30) -> tuple[EdgeStore, EdgeStore]:
    """Two stores with the same exact-only collection: one with the scan, one without (Edge only)."""
    pair = (EdgeStore(tmp_path / "scan", index_idle_seconds=None, exact_scan_max_bytes=max_bytes),
            EdgeStore(tmp_path / "edge", index_idle_seconds=None, exact_scan_max_bytes=0))
    for store in pair:
        store.create_collection(CollectionMeta(name="c", dim=DIM, exact_only=True))
    return pair


def fill(stores: tuple[EdgeStore, ...], n: int, seed: int = 0) -> list[str]:
    """Upserts ``n`` clustered points (ids from their paths ``c<label>/img<i>.jpg``: another seed
    overwrites some points of an earlier fill and adds others); returns their ids."""
    vectors, labels = clustered(n, DIM, seed=seed)
    # Not unit length: both sides normalise as Qdrant does for cosine.
    points = [dataclasses.replace(p, id=point_id(p.payload.dataset, p.payload.path))
              for p in make_points(vectors * 3.0, labels)]
    for store in stores:
        store.upsert("c", points)
    return [p.id for p in points]


def queries(n: int, limit: int, seed: int, **kw: object) -> list[Query]:
    rng = np.random.default_rng(seed)
    return [Query(vector=rng.standard_normal(DIM).astype(np.float32), limit=limit, exact=True, **kw)  # type: ignore[arg-type]
            for _ in range(n)]


def compare(scan: EdgeStore, edge: EdgeStore, qs: list[Query]) -> None:
    for ours, theirs in zip(scan.query("c", qs), edge.query("c", qs), strict=True):
        same_hits(ours, theirs)


def test_the_scan_answers_as_edge_does(tmp_path: Path) -> None:
    scan, edge = stores(tmp_path)
    try:
        ids = fill((scan, edge), 700)
        assert scan._collections["c"].scan is not None and len(scan._collections["c"].scan) == 700
        compare(scan, edge, queries(40, 25, seed=1))
        compare(scan, edge, queries(3, 1000, seed=2))  # more than there are: every point, ranked
        # Exclusions (some unknown), payloads and stored vectors, as Edge gives them.
        qs = queries(10, 10, seed=3, exclude_ids=(ids[0], ids[5], "00000000-0000-0000-0000-000000000000"),
                     with_payload=True, with_vector=True)
        for ours, theirs in zip(scan.query("c", qs), edge.query("c", qs), strict=True):
            same_hits(ours, theirs)
            assert [h.payload for h in ours] == [h.payload for h in theirs]
            for a, b in zip(ours, theirs, strict=True):
                if a.id == b.id:
                    np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)
        assert scan.stored_vectors("c", ids[:3]).keys() == edge.stored_vectors("c", ids[:3]).keys()
        for pid, vector in scan.stored_vectors("c", ids[:3]).items():
            np.testing.assert_allclose(vector, edge.stored_vectors("c", [pid])[pid], atol=1e-6)
        # A filtered query goes to Edge, and is answered.
        flt = [Query(vector=q.vector, limit=5, filter=Filter(labels_any=("c1",))) for q in queries(5, 5, seed=4)]
        compare(scan, edge, flt)
        assert all(h.payload is not None and "c1" in h.payload.labels for hits in scan.query("c", flt) for h in hits)
    finally:
        scan.close()
        edge.close()


def test_writes_and_deletes_reach_the_scan_and_a_restart_reads_it_back(tmp_path: Path) -> None:
    scan, edge = stores(tmp_path)
    try:
        ids = fill((scan, edge), 300)
        fill((scan, edge), 100, seed=9)  # overwrites some points, adds others
        for store in (scan, edge):
            store.delete("c", ids[::3])
        compare(scan, edge, queries(30, 50, seed=5))
        # Re-writing points with new vectors replaces them.
        moved = edge.retrieve("c", ids[1:10:3], with_vector=True)
        for p in moved:
            p.vector[:] = -p.vector
        for store in (scan, edge):
            store.upsert("c", moved)
        compare(scan, edge, queries(30, 50, seed=6))
    finally:
        scan.close()
    reopened = EdgeStore(tmp_path / "scan", index_idle_seconds=None)
    try:
        assert reopened._collections["c"].scan_pending  # read from Edge on first use
        compare(reopened, edge, queries(30, 50, seed=7))
        assert len(reopened._collections["c"].scan or ()) == edge.count("c", None)
        fill((reopened, edge), 50, seed=11)
        compare(reopened, edge, queries(10, 50, seed=8))
    finally:
        reopened.close()
        edge.close()


def test_a_collection_past_the_memory_bound_is_searched_on_edge(tmp_path: Path) -> None:
    scan, edge = stores(tmp_path, max_bytes=200 * DIM * 4)
    try:
        fill((scan, edge), 150)
        assert scan._collections["c"].scan is not None
        fill((scan, edge), 100, seed=3)  # 250 points > 200
        assert scan._collections["c"].scan is None
        compare(scan, edge, queries(20, 30, seed=1))
    finally:
        scan.close()
        edge.close()


def test_the_scan_itself() -> None:
    scan = ExactScan(3, max_bytes=4 * 3 * 4)
    assert scan.search(np.ones((2, 3), np.float32), [5, 5]) and len(scan) == 0
    assert scan.upsert(["a", "b", "a"], np.array([[1, 0, 0], [0, 2, 0], [3, 3, 0]], np.float32))
    assert len(scan) == 2  # "a" written twice: the last one wins
    np.testing.assert_allclose(scan.vectors(["a"])["a"], normalise(np.array([3, 3, 0], np.float32)))
    [hits] = scan.search(np.array([[1, 0.1, 0]], np.float32), [5], [["b"]], with_vectors=True)
    assert hits.ids.tolist() == ["a"] and hits.vectors is not None and hits.vectors.shape == (1, 3)
    assert not scan.upsert(["c", "d", "e"], np.eye(3, dtype=np.float32))  # 5 points > 4: refused whole
    assert len(scan) == 2
    assert scan.delete(["a", "zz"]) == 1 and scan.vectors(["a", "b"]).keys() == {"b"}
    [hits] = scan.search(np.array([[0, 1, 0]], np.float32), [1])
    assert hits.ids.tolist() == ["b"] and hits.scores.tolist() == pytest.approx([1.0])
