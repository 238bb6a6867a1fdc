"""The search core on each backend (Edge, qdrant-client local mode, and a server when QDRANT_URL is set)."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.search.core import SearchCore
from services.search.store import Filter, IndexStatus, Payload, Point, Query, point_id
from tests.search.conftest import clustered, make_points

DIM = 16


def _loaded(core: SearchCore, name: str, n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    vectors, labels = clustered(n, DIM, seed=seed)
    core.create_collection(name, DIM, model="m", dataset="ds")
    points = make_points(vectors, labels)
    for start in range(0, n, 50):
        core.upsert(name, points[start:start + 50])
    return vectors, labels


def _exact_top(vectors: np.ndarray, query: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[int]:
    scores = vectors @ (query / np.linalg.norm(query))
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[i])]


def _ids(indices: list[tuple[int, int]]) -> list[str]:
    return [point_id("ds", f"c{c}/img{i}.jpg") for i, c in indices]


def test_collection_lifecycle(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    info = core.create_collection(name, DIM, model="m", dataset="ds")
    assert (info.meta.dim, info.meta.model, info.meta.dataset, info.points_count) == (DIM, "m", "ds", 0)
    with pytest.raises(AlreadyExists, match="set exist_ok"):
        core.create_collection(name, DIM)
    assert core.create_collection(name, DIM, exist_ok=True).meta.model == "m"
    with pytest.raises(FailedPrecondition, match=f"exists with dim {DIM}, not 32"):
        core.create_collection(name, 32, exist_ok=True)
    with pytest.raises(FailedPrecondition, match="model 'm', not 'other'"):
        core.create_collection(name, DIM, model="other", exist_ok=True)
    assert name in [i.meta.name for i in core.list_collections()]
    assert core.get_collection(name).status in (IndexStatus.GREEN, IndexStatus.YELLOW)
    core.delete_collection(name)
    with pytest.raises(NotFound):
        core.get_collection(name)
    with pytest.raises(NotFound):
        core.delete_collection(name)


def test_bad_collection_requests(core: SearchCore, prefix: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid name"):
        core.create_collection("../escape", DIM)
    with pytest.raises(InvalidArgument, match="dim 0 is not between"):
        core.create_collection(f"{prefix}__m", 0)
    with pytest.raises(NotFound, match="no collection or alias named"):
        core.search(f"{prefix}__missing", Query(np.ones(DIM, np.float32), 3))


def test_search_matches_exact_ranking_with_scores(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    vectors, labels = _loaded(core, name)
    query = vectors[3] + 0.1
    hits = core.search(name, Query(query, 10, exact=True))
    top = _exact_top(vectors, query, 10)
    assert [h.id for h in hits] == _ids([(i, labels[i]) for i in top])
    expected = vectors[top] @ (query / np.linalg.norm(query))
    np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-5)
    assert hits[0].payload == Payload("ds", f"c{labels[top[0]]}/img{top[0]}.jpg",
                                      ("c" + str(labels[top[0]]),) + (("x",) if top[0] % 7 == 0 else ()))
    # The approximate path (HNSW where the collection is indexed) agrees on this small set.
    assert [h.id for h in core.search(name, Query(query, 10))] == [h.id for h in hits]


def test_filters_and_exclusions(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    vectors, labels = _loaded(core, name)
    query = vectors[0]
    n = len(vectors)
    label_mask = np.array([labels[i] == 1 or i % 7 == 0 for i in range(n)])
    hits = core.search(name, Query(query, 8, Filter(labels_any=("c1", "x")), exact=True))
    assert [h.id for h in hits] == _ids([(i, labels[i]) for i in _exact_top(vectors, query, 8, label_mask)])

    prefix_mask = labels == 2
    hits = core.search(name, Query(query, 5, Filter(dataset="ds", path_prefix="c2/"), exact=True))
    assert [h.id for h in hits] == _ids([(i, labels[i]) for i in _exact_top(vectors, query, 5, prefix_mask)])
    assert core.search(name, Query(query, 5, Filter(dataset="other"))) == []

    best = _exact_top(vectors, query, 3)
    excluded = tuple(_ids([(i, labels[i]) for i in best]))
    hits = core.search(name, Query(query, 3, exclude_ids=excluded, exact=True))
    mask = np.ones(n, bool)
    mask[best] = False
    assert [h.id for h in hits] == _ids([(i, labels[i]) for i in _exact_top(vectors, query, 3, mask)])
    assert not set(excluded) & {h.id for h in hits}


def test_batch_by_id_count_scroll(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    vectors, labels = _loaded(core, name)
    other = f"{prefix}__n"
    core.create_collection(other, 4)
    core.upsert(other, [Point("", np.array([1, 0, 0, 0], np.float32), Payload("ds", "a.jpg"))])
    single = [core.search(name, Query(vectors[i], 4, exact=True)) for i in range(3)]
    batch = core.search_batch([(name, Query(vectors[i], 4, exact=True)) for i in range(2)]
                              + [(other, Query(np.array([0, 1, 0, 1], np.float32), 2))]
                              + [(name, Query(vectors[2], 4, exact=True))])
    assert [[h.id for h in r] for r in batch[:2] + batch[3:]] == [[h.id for h in r] for r in single]
    assert [h.id for h in batch[2]] == [point_id("ds", "a.jpg")]

    own = point_id("ds", f"c{labels[5]}/img5.jpg")
    by_id = core.search_by_id(name, own, 5, exact=True, with_vector=True)
    assert own not in [h.id for h in by_id]
    assert [h.id for h in by_id] == [h.id for h in core.search(name, Query(vectors[5], 6, exact=True))][1:]
    assert by_id[0].vector is not None and by_id[0].vector.shape == (DIM,)
    with pytest.raises(NotFound, match="no point"):
        core.search_by_id(name, point_id("ds", "missing.jpg"), 5)

    assert core.count(name) == len(vectors)
    assert core.count(name, Filter(labels_any=("c3",))) == int((labels == 3).sum())
    seen: list[str] = []
    offset = ""
    while True:
        page, offset = core.scroll(name, Filter(path_prefix="c0/"), limit=7, offset=offset)
        seen += [p.id for p in page]
        if not offset:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == int((labels == 0).sum())


def test_upsert_is_idempotent_and_delete_counts(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    vectors, labels = _loaded(core, name)
    points = make_points(vectors[:10], labels[:10])
    assert core.upsert(name, points) == 10
    assert core.count(name) == len(vectors)
    ids = [point_id("ds", p.payload.path) for p in points]
    assert core.delete(name, [*ids[:3], point_id("ds", "never.jpg")]) == 3
    assert core.count(name) == len(vectors) - 3


def test_a_point_sent_twice_in_one_message_counts_once(core: SearchCore, prefix: str) -> None:
    """Issue 9, defect 13: ``upserted`` counted duplicate ids."""
    name = f"{prefix}__m"
    core.create_collection(name, DIM)
    vectors, labels = clustered(5, DIM)
    points = make_points(vectors, labels)
    moved = Point("", vectors[0] * -1, points[0].payload)  # same id as points[0], another vector
    assert core.upsert(name, [*points, points[1], moved]) == 5
    assert core.count(name) == 5
    # The last copy of a point wins, as it would in the engine.
    [stored] = core.store.retrieve(name, [point_id("ds", points[0].payload.path)], with_vector=True)
    assert np.allclose(stored.vector, -vectors[0] / np.linalg.norm(vectors[0]), atol=1e-5)


def test_bad_points_and_queries_are_precise(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    _loaded(core, name, n=20)
    good = np.ones(DIM, np.float32)

    def upsert_error(point: Point, position: int = 1) -> str:
        batch = [Point("", good, Payload("ds", "ok.jpg"))] * position + [point]
        with pytest.raises((InvalidArgument, ResourceExhausted)) as err:
            core.upsert(name, batch)
        return err.value.message  # type: ignore[no-any-return]

    assert upsert_error(Point("", np.ones(5, np.float32), Payload("ds", "a.jpg")), 17) == (
        f"upsert message 0, point 17 of 18: vector has 5 values, collection '{name}' has dim {DIM}")
    nan = good.copy()
    nan[3] = np.nan
    assert "non-finite value (nan) at index 3" in upsert_error(Point("", nan, Payload("ds", "a.jpg")))
    inf = good.copy()
    inf[0] = np.inf
    assert "non-finite value (inf) at index 0" in upsert_error(Point("", inf, Payload("ds", "a.jpg")))
    assert "all zeros" in upsert_error(Point("", np.zeros(DIM, np.float32), Payload("ds", "a.jpg")))
    assert "not a point id" in upsert_error(Point("nope", good, Payload()))
    assert "no id, and no payload" in upsert_error(Point("", good, Payload()))
    assert "payload has no path" in upsert_error(Point("", good, Payload("ds", "")))
    assert "is not the id of" in upsert_error(Point(point_id("ds", "b.jpg"), good, Payload("ds", "a.jpg")))
    assert "labels[1] is empty" in upsert_error(Point("", good, Payload("ds", "a.jpg", ("c1", ""))))
    assert "65 points; at most 64" in upsert_error(Point("", good, Payload("ds", "a.jpg")), 64)
    # Nothing of a rejected message was written.
    assert core.count(name) == 20

    def search_error(query: Query) -> str:
        with pytest.raises(InvalidArgument) as err:
            core.search(name, query)
        return err.value.message  # type: ignore[no-any-return]

    assert search_error(Query(good, 0)) == "search: limit 0 is not between 1 and 500"
    assert search_error(Query(np.ones(3, np.float32), 5)) == f"search: vector has 3 values, collection '{name}' " \
                                                             f"has dim {DIM}"
    assert "labels_any[1] is empty" in search_error(Query(good, 5, Filter(labels_any=("c1", ""))))
    assert "exclude_ids[0]" in search_error(Query(good, 5, exclude_ids=("x",)))
    with pytest.raises(ResourceExhausted, match="9 queries; at most 8"):
        core.search_batch([(name, Query(good, 1))] * 9)
    with pytest.raises(NotFound, match="query 1 of 2: no collection or alias"):
        core.search_batch([(name, Query(good, 1)), (f"{prefix}__missing", Query(good, 1))])
    with pytest.raises(InvalidArgument, match="query 1 of 2: vector has 2 values"):
        core.search_batch([(name, Query(good, 1)), (name, Query(np.ones(2, np.float32), 1))])


def test_upsert_stream_acknowledges_each_message(core: SearchCore, prefix: str) -> None:
    name = f"{prefix}__m"
    core.create_collection(name, DIM)
    vectors, labels = clustered(30, DIM)
    points = make_points(vectors, labels)
    session = core.upsert_session()
    assert session.add(name, points[:10]) == 10
    assert session.add("", points[10:20]) == 10
    with pytest.raises(InvalidArgument) as err:
        session.add(name, [*points[20:25], Point("", np.ones(3, np.float32), Payload("ds", "bad.jpg"))])
    assert err.value.message.startswith("upsert message 2, point 5 of 6: vector has 3 values")
    assert core.count(name) == 20
    with pytest.raises(InvalidArgument, match="names collection 'other', but the stream began with"):
        session.add("other", points[25:])


def test_alias_swap_is_atomic_for_readers(core: SearchCore, prefix: str) -> None:
    old, new, alias = f"{prefix}__old", f"{prefix}__new", f"{prefix}__current"
    core.create_collection(old, 4, model="old")
    core.create_collection(new, 8, model="new")
    core.upsert(old, [Point("", np.array([1, 0, 0, 0], np.float32), Payload("ds", "a.jpg"))])
    core.upsert(new, [Point("", np.eye(8, dtype=np.float32)[i], Payload("ds", f"{i}.jpg")) for i in range(2)])
    core.set_alias(alias, old)
    assert core.get_collection(alias).meta.name == old
    assert len(core.search(alias, Query(np.ones(4, np.float32), 5))) == 1
    core.set_alias(alias, new)  # re-indexing with a new model: the alias moves in one step
    info = core.get_collection(alias)
    assert (info.meta.name, info.meta.dim, info.aliases) == (new, 8, (alias,))
    assert len(core.search(alias, Query(np.ones(8, np.float32), 5))) == 2
    with pytest.raises(InvalidArgument, match=f"vector has 4 values, collection '{new}' has dim 8"):
        core.search(alias, Query(np.ones(4, np.float32), 5))
    assert core.list_aliases()[alias] == new
    with pytest.raises(AlreadyExists, match="is an alias"):
        core.create_collection(alias, 8)
    with pytest.raises(FailedPrecondition, match="is an alias"):
        core.delete_collection(alias)
    with pytest.raises(InvalidArgument, match="an alias must point at a collection"):
        core.set_alias(f"{prefix}__other", alias)
    with pytest.raises(NotFound):
        core.set_alias(f"{prefix}__other", f"{prefix}__missing")
    core.delete_collection(new)  # its aliases go with it
    assert alias not in core.list_aliases()
    with pytest.raises(NotFound):
        core.delete_alias(alias)
