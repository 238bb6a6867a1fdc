"""What one request may cost the search service, bounded before any work starts (issue 9, defects 5
and 7), and leave-one-out queries by stored point in one batch. On each backend."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.common.errors import NotFound, ResourceExhausted
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.store import Query, point_id
from tests.search.conftest import BACKENDS, clustered, make_points, make_store

DIM = 16


@pytest.fixture(params=BACKENDS)
def small(request: pytest.FixtureRequest, tmp_path: object) -> SearchCore:
    settings = SearchSettings(max_limit=10_000, max_batch_queries=1024, max_batch_hits=2_000,
                              max_collections=3, max_message_bytes=1 << 19)
    core = SearchCore(settings, make_store(request.param, tmp_path))  # type: ignore[arg-type]
    vectors, labels = clustered(300, DIM)
    core.create_collection("c", DIM)
    core.upsert("c", make_points(vectors, labels))
    yield core  # type: ignore[misc]
    core.close()


def test_batch_hits_are_capped_before_any_query_runs(small: SearchCore) -> None:
    vector = np.ones(DIM, np.float32)
    calls: list[int] = []
    real_query = small.store.query
    small.store.query = lambda name, queries: calls.append(len(queries)) or real_query(name, queries)  # type: ignore
    start = time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"128 queries asking for 1280000 hits in all; at most 2000"):
        small.search_batch([("c", Query(vector, 10_000))] * 128)
    assert time.monotonic() - start < 0.5 and calls == []
    # ...and the estimated answer size, with vectors and payloads, against the message limit.
    with pytest.raises(ResourceExhausted, match="over the 524288-byte message limit"):
        small.search_batch([("c", Query(vector, 125, with_payload=True, with_vector=True))] * 16)
    assert calls == []
    assert len(small.search_batch([("c", Query(vector, 10))] * 200)) == 200


def test_collections_per_server_are_capped(small: SearchCore) -> None:
    small.create_collection("d", DIM)
    small.create_collection("e", DIM)
    with pytest.raises(ResourceExhausted, match=r"holds 3 collections, the limit .* is 3"):
        small.create_collection("f", DIM)
    small.create_collection("e", DIM, exist_ok=True)  # reusing one is not creating one
    small.delete_collection("d")
    small.create_collection("f", DIM)


def test_queries_by_stored_point_in_one_batch(small: SearchCore) -> None:
    vectors, labels = clustered(300, DIM)
    ids = [point_id("ds", p.payload.path) for p in make_points(vectors, labels)]
    batch = small.search_batch([("c", Query(np.empty(0, np.float32), 5, exact=True, point_id=pid)) for pid in ids[:40]])
    for q, hits in enumerate(batch):
        scores = vectors @ vectors[q]
        scores[q] = -np.inf  # the point itself is never a hit
        assert [h.id for h in hits] == [ids[i] for i in np.argsort(-scores, kind="stable")[:5]]
    one = small.search_by_id("c", ids[3], 5, exact=True)
    assert [h.id for h in one] == [h.id for h in batch[3]]
    missing = point_id("ds", "never.jpg")
    with pytest.raises(NotFound, match=f"query 1 of 2: no point {missing}"):
        small.search_batch([("c", Query(np.empty(0, np.float32), 5, point_id=ids[0])),
                            ("c", Query(np.empty(0, np.float32), 5, point_id=missing))])


def test_exact_only_collections_never_build_an_index(tmp_path: object) -> None:
    """An evaluation index is queried once and dropped: building its HNSW graph (in a child process,
    on the same cores) only slowed its queries down."""
    from pathlib import Path

    from services.search.edge_store import EdgeStore
    from services.search.store import IndexStatus

    store = EdgeStore(Path(str(tmp_path)) / "edge", index_idle_seconds=0.05)
    built: list[str] = []
    real_build = store._build

    def spy(collection: object, *args: object, **kwargs: object) -> object:
        built.append(collection.meta.name)  # type: ignore[attr-defined]
        return real_build(collection, *args, **kwargs)  # type: ignore[arg-type]

    store._build = spy  # type: ignore[method-assign]
    core = SearchCore(SearchSettings(), store)
    try:
        vectors, labels = clustered(200, DIM)
        for name, exact_only in (("plain", False), ("exact", True)):
            info = core.create_collection(name, DIM, exact_only=exact_only)
            assert info.meta.exact_only is exact_only
            core.upsert(name, make_points(vectors, labels))
        deadline = time.monotonic() + 30
        while "plain" not in built and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert built == ["plain"]
        assert core.get_collection("exact").status == IndexStatus.GREEN
        assert core.get_collection("exact").meta.exact_only  # kept in the collection's metadata
    finally:
        core.close()
    reopened = EdgeStore(Path(str(tmp_path)) / "edge", index_idle_seconds=None)
    assert reopened.resolve("exact").exact_only and not reopened.resolve("plain").exact_only
    reopened.close()
