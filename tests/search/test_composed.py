"""Composed queries (image + text, DESIGN §5) in the search core on each backend, and through gRPC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.clients import QueryPart, SearchClient
from services.common.errors import InvalidArgument, NotFound
from services.common.vectors import compose
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.servicer import create_search_server
from services.search.store import Query, point_id
from services.search.store import QueryPart as StoreQueryPart
from tests.search.conftest import clustered, make_points

DIM = 16


def test_compose_is_the_normalised_weighted_sum_of_normalised_parts() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(DIM) * 3, rng.standard_normal(DIM) * 0.1
    expected = 0.7 * a / np.linalg.norm(a) + 0.3 * b / np.linalg.norm(b)
    np.testing.assert_allclose(compose([a, b], [0.7, 0.3]), expected / np.linalg.norm(expected), atol=1e-6)
    rows = compose([np.stack([a, a]), np.stack([b, -a])], [1.0, 1.0])
    np.testing.assert_allclose(rows[0], compose([a, b], [1, 1]), atol=1e-6)
    assert np.isnan(rows[1]).all()  # a + (-a) has no direction


def _loaded(core: SearchCore, name: str) -> np.ndarray:
    vectors, labels = clustered(60, DIM, seed=3)
    core.create_collection(name, DIM, model="m", dataset="ds")
    core.upsert(name, make_points(vectors, labels))
    return vectors


def _exact(vectors: np.ndarray, query: np.ndarray, k: int, drop: int | None = None) -> list[str]:
    scores = vectors @ query
    if drop is not None:
        scores[drop] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [point_id("ds", f"c{c}/img{i}.jpg") for i, c in ((int(i), _labels()[int(i)]) for i in order)]


def _labels() -> np.ndarray:
    return clustered(60, DIM, seed=3)[1]


def test_a_composed_query_ranks_by_the_composed_vector(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__c"
    vectors = _loaded(core, name)
    text = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    stored = point_id("ds", f"c{_labels()[5]}/img5.jpg")
    query = Query(np.empty(0, np.float32), 8, exact=True,
                  parts=(StoreQueryPart(np.empty(0, np.float32), 0.6, stored), StoreQueryPart(text, 0.4)))
    hits = core.search(name, query)
    expected_vector = compose([vectors[5], text], [0.6, 0.4])
    assert [h.id for h in hits] == _exact(vectors, expected_vector, 8, drop=5)  # the stored part is left out
    order = [int(i) for i in np.argsort(-(vectors @ expected_vector), kind="stable") if i != 5][:8]
    np.testing.assert_allclose([h.score for h in hits], vectors[order] @ expected_vector, atol=1e-5)
    # The same through a batch, beside a plain query.
    batch = core.search_batch([(name, query), (name, Query(vectors[0], 3, exact=True))])
    assert [h.id for h in batch[0]] == [h.id for h in hits] and len(batch[1]) == 3


def test_bad_composed_queries_are_refused_precisely(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__c"
    vectors = _loaded(core, name)
    empty = np.empty(0, np.float32)
    v = vectors[0]
    cases = [
        (Query(v, 3, parts=(StoreQueryPart(v, 1.0),)), InvalidArgument, "not several"),
        (Query(empty, 3, parts=(StoreQueryPart(v, float("nan")),)), InvalidArgument, "not finite"),
        (Query(empty, 3, parts=(StoreQueryPart(v, 0.0), StoreQueryPart(v, 0.0))), InvalidArgument, "weight 0"),
        (Query(empty, 3, parts=(StoreQueryPart(v, 1.0), StoreQueryPart(-v, 1.0))), InvalidArgument, "sum to zero"),
        (Query(empty, 3, parts=(StoreQueryPart(v[:4], 1.0),)), InvalidArgument, "composed\\[0\\]: vector has 4"),
        (Query(empty, 3, parts=tuple(StoreQueryPart(v, 1.0) for _ in range(9))), InvalidArgument, "at most 8"),
        (Query(empty, 3, parts=(StoreQueryPart(empty, 1.0, point_id("ds", "nope.jpg")),)), NotFound, "no point"),
    ]
    for query, error, message in cases:
        with pytest.raises(error, match=message):
            core.search(name, query)


def test_composed_queries_through_the_service(tmp_path: Path) -> None:
    running, core = create_search_server(SearchSettings(port=0, metrics_port=-1, data_dir=tmp_path / "s"))
    try:
        vectors, labels = clustered(40, DIM, seed=2)
        client = SearchClient(f"127.0.0.1:{running.port}")
        client.create_collection("c", DIM)
        ids = client.upsert("c", "ds", [f"c{c}/img{i}.jpg" for i, c in enumerate(labels)],
                            [(f"c{c}",) for c in labels], vectors).ids
        text = vectors[7] + vectors[8]
        parts = [QueryPart(0.5, point_id=ids[3]), QueryPart(0.5, vector=text)]
        hits = client.search_composed("c", parts, 5, exact=True)
        expected = compose([vectors[3], text], [0.5, 0.5])
        order = [int(i) for i in np.argsort(-(vectors @ expected), kind="stable") if i != 3][:5]
        assert [h.id for h in hits] == [ids[i] for i in order]
        top = client.top_k("c", 5, composed=[parts, [QueryPart(1.0, vector=vectors[1])]])
        assert top.ids[0] == [h.id for h in hits] and top.ids[1][0] == ids[1]
        client.close()
    finally:
        running.stop(0)
        core.close()
