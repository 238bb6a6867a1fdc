"""Congruence: the same cases on Qdrant Edge and on qdrant-client local mode give the same answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.store import Filter, Hit, IndexParams, Query
from tests.search.conftest import clustered, make_points, make_store

DIM = 32
N = 900
NAME = "ds__m"
# A threshold this low gives Edge an HNSW index over the test set (the default 10 MB would not).
HNSW = IndexParams(m=16, ef_construct=100, ef=64, indexing_threshold_kb=20)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SearchCore, SearchCore, np.ndarray]]:
    """(Edge core with an HNSW index built, local-mode core), holding the same points, and the vectors."""
    vectors, labels = clustered(N, DIM, classes=8, seed=1)
    points = make_points(vectors, labels)
    cores = []
    for kind in ("edge", "qdrant-local"):
        store = make_store(kind, Path(tmp_path_factory.mktemp(kind)), HNSW)
        core = SearchCore(SearchSettings(max_upsert_points=256), store)
        core.create_collection(NAME, DIM, model="m", dataset="ds")
        for start in range(0, N, 200):
            core.upsert(NAME, points[start:start + 200])
        store.optimize(NAME)
        cores.append(core)
    yield cores[0], cores[1], vectors
    for core in cores:
        core.close()


def _same(a: list[Hit], b: list[Hit]) -> None:
    assert [h.id for h in a] == [h.id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    assert [h.payload for h in a] == [h.payload for h in b]


FILTERS: list[Filter | None] = [None, Filter(labels_any=("c1",)), Filter(labels_any=("c2", "x")),
                                Filter(path_prefix="c3/img1"), Filter(dataset="ds", labels_any=("c4",)),
                                Filter(dataset="nope")]


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: "none" if f is None else repr(f))
def test_exact_search_is_identical(pair: tuple[SearchCore, SearchCore, np.ndarray], flt: Filter | None) -> None:
    edge, local, _ = pair
    rng = np.random.default_rng(7)
    for _ in range(10):
        query = Query(rng.standard_normal(DIM).astype(np.float32), 10, flt, exact=True)
        _same(edge.search(NAME, query), local.search(NAME, query))
        assert edge.count(NAME, flt) == local.count(NAME, flt)


def test_hnsw_agrees_with_exact(pair: tuple[SearchCore, SearchCore, np.ndarray]) -> None:
    edge, local, vectors = pair
    assert edge.store.stats(NAME).status.value == "green"
    rng = np.random.default_rng(8)
    found = 0
    for _ in range(50):
        q = vectors[rng.integers(N)] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
        approx = {h.id for h in edge.search(NAME, Query(q, 10))}
        exact = {h.id for h in local.search(NAME, Query(q, 10))}
        found += len(approx & exact)
    assert found / 500 >= 0.98


def test_by_id_batch_exclusions_and_scroll_agree(pair: tuple[SearchCore, SearchCore, np.ndarray]) -> None:
    edge, local, vectors = pair
    ids, _ = local.scroll(NAME, limit=40)
    excluded = tuple(p.id for p in ids[:5])
    for point in ids[5:15]:
        for flt in (None, Filter(labels_any=("c0", "c5"))):
            _same(edge.search_by_id(NAME, point.id, 7, flt, excluded, exact=True),
                  local.search_by_id(NAME, point.id, 7, flt, excluded, exact=True))
    batch = [(NAME, Query(vectors[i], 5, FILTERS[i % len(FILTERS)], exact=True)) for i in range(8)]
    for a, b in zip(edge.search_batch(batch), local.search_batch(batch), strict=True):
        _same(a, b)

    def pages(core: SearchCore) -> list[list[str]]:
        out, offset = [], ""
        while True:
            page, offset = core.scroll(NAME, Filter(labels_any=("c2",)), limit=25, offset=offset)
            out.append([p.id for p in page])
            if not offset:
                return out

    assert pages(edge) == pages(local)


def test_writes_agree(tmp_path: Path) -> None:
    vectors, labels = clustered(200, 8, seed=3)
    points = make_points(vectors, labels)
    results: list[list[object]] = []
    for kind in ("edge", "qdrant-local"):
        core = SearchCore(SearchSettings(), make_store(kind, tmp_path / kind))
        core.create_collection(NAME, 8)
        ops: list[Callable[[], object]] = [
            lambda c=core: c.upsert(NAME, points),
            lambda c=core: c.delete(NAME, [p.id for p in c.scroll(NAME, limit=30)[0]]),
            lambda c=core: c.upsert(NAME, points[:50]),  # overwrites some, re-adds some
            lambda c=core: c.count(NAME),
            lambda c=core: [h.id for h in c.search(NAME, Query(vectors[0], 20, exact=True))],
        ]
        results.append([op() for op in ops])
        core.close()
    assert results[0] == results[1]
