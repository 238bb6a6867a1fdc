"""Qdrant Edge store specifics: persistence, the data-directory lock, background index builds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import FailedPrecondition
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.edge_store import EdgeStore
from services.search.store import IndexParams, IndexStatus, Query
from tests.search.conftest import clustered, make_points


def test_collections_points_and_aliases_survive_reopening(tmp_path: Path) -> None:
    vectors, labels = clustered(300, 16, seed=2)
    core = SearchCore(SearchSettings(), EdgeStore(tmp_path, index_idle_seconds=None))
    core.create_collection("ds__m", 16, model="m", dataset="ds")
    core.upsert("ds__m", make_points(vectors, labels))
    core.set_alias("current", "ds__m")
    before = core.search("current", Query(vectors[0], 10, exact=True))
    core.close()

    reopened = SearchCore(SearchSettings(), EdgeStore(tmp_path, index_idle_seconds=None))
    info = reopened.get_collection("current")
    assert (info.meta.name, info.meta.dim, info.meta.model, info.meta.dataset) == ("ds__m", 16, "m", "ds")
    assert info.points_count == 300 and info.aliases == ("current",)
    assert reopened.search("current", Query(vectors[0], 10, exact=True)) == before
    reopened.close()


def test_a_data_dir_is_opened_by_one_store_at_a_time(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, index_idle_seconds=None)
    with pytest.raises(FailedPrecondition, match="in use by another search service"):
        EdgeStore(tmp_path, index_idle_seconds=None)
    store.close()
    EdgeStore(tmp_path, index_idle_seconds=None).close()


def test_interrupted_creations_and_deletions_leave_nothing_visible(tmp_path: Path) -> None:
    (tmp_path / "collections" / ".creating-abc" / "shard").mkdir(parents=True)
    (tmp_path / "collections" / ".deleting-def").mkdir()
    store = EdgeStore(tmp_path, index_idle_seconds=None)
    assert store.list_collections() == []
    assert sorted(p.name for p in (tmp_path / "collections").iterdir()) == []
    store.close()


def test_index_is_built_in_the_background_after_writes_pause(tmp_path: Path) -> None:
    built: list[tuple[str, float]] = []
    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20, ef_construct=64), index_idle_seconds=0.3,
                      on_index_built=lambda name, seconds: built.append((name, seconds)))
    core = SearchCore(SearchSettings(), store)
    vectors, labels = clustered(900, 32, classes=8)
    core.create_collection("ds__m", 32)
    core.upsert("ds__m", make_points(vectors, labels))
    assert core.get_collection("ds__m").status == IndexStatus.YELLOW
    deadline = time.monotonic() + 60
    while core.get_collection("ds__m").status != IndexStatus.GREEN and time.monotonic() < deadline:
        time.sleep(0.1)
    assert core.get_collection("ds__m").status == IndexStatus.GREEN
    assert [name for name, _ in built][-1] == "ds__m"
    shard_info = store._collections["ds__m"].shard.info()
    assert shard_info.indexed_vectors_count == 900  # HNSW over every point, not a plain scan
    hits = core.search("ds__m", Query(vectors[10], 10))
    exact = core.search("ds__m", Query(vectors[10], 10, exact=True))
    assert len({h.id for h in hits} & {h.id for h in exact}) >= 9
    core.close()


def test_deleting_a_collection_removes_its_directory(tmp_path: Path) -> None:
    core = SearchCore(SearchSettings(), EdgeStore(tmp_path, index_idle_seconds=None))
    core.create_collection("a", 4)
    core.upsert("a", make_points(np.eye(4, dtype=np.float32), np.arange(4)))
    assert (tmp_path / "collections" / "a" / "shard").is_dir()
    core.delete_collection("a")
    assert list((tmp_path / "collections").iterdir()) == []
    core.create_collection("a", 8)  # the name is free again, with another dim
    assert core.count("a") == 0
    core.close()


class _CountingShard:
    """Delegates to an Edge shard and records the size of each query_batch call."""

    def __init__(self, shard: object) -> None:
        self._shard = shard
        self.batch_sizes: list[int] = []

    def query_batch(self, request: object) -> object:
        result = self._shard.query_batch(request)  # type: ignore[attr-defined]
        self.batch_sizes.append(len(result))
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self._shard, name)


def test_a_large_batch_reaches_edge_in_slices_bounded_by_scan_cost(tmp_path: Path) -> None:
    # Edge holds the GIL for a whole query call, so a batch of 256 exact queries once stalled every
    # other RPC of the service (health checks included) for its whole duration: it went to Edge as
    # one call. Now each call scans at most scan_components_per_call components (points x dim).
    vectors, labels = clustered(300, 16, seed=3)
    store = EdgeStore(tmp_path, index_idle_seconds=None, scan_components_per_call=300 * 16 * 10)
    core = SearchCore(SearchSettings(), store)
    core.create_collection("ds__m", 16)
    core.upsert("ds__m", make_points(vectors, labels))
    queries = [Query(vectors[i], 7, exact=True) for i in range(35)]
    one_by_one = [core.search("ds__m", q) for q in queries]
    spy = _CountingShard(store._collections["ds__m"].shard)
    store._collections["ds__m"].shard = spy  # type: ignore[assignment]
    assert core.search_batch([("ds__m", q) for q in queries]) == one_by_one
    assert spy.batch_sizes == [10, 10, 10, 5]
    store._collections["ds__m"].shard = spy._shard  # type: ignore[assignment]
    core.close()
