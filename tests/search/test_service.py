"""The search service over a real gRPC channel: contract, status codes, streams, health, reflection, metrics."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from retrieval.v1 import search_pb2, search_pb2_grpc

from services.common.clients import channel, point_message, upsert_messages, wait_serving
from services.common.server import RunningServer
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.qdrant_store import QdrantStore
from services.search.servicer import create_search_server
from services.search.store import point_id
from tests.search.conftest import clustered

DIM = 16
Stub = search_pb2_grpc.SearchServiceStub


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, SearchCore, Stub]]:
    settings = SearchSettings(port=0, metrics_port=0, data_dir=Path(tmp_path_factory.mktemp("search")),
                              max_upsert_points=64, max_upsert_bytes=16 * 1024, index_idle_seconds=0.5)
    running, core = create_search_server(settings)
    chan = channel(f"127.0.0.1:{running.port}")
    wait_serving(chan, timeout=30)
    yield running, core, search_pb2_grpc.SearchServiceStub(chan)
    chan.close()
    running.stop(0)
    core.close()


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()  # type: ignore[attr-defined]


def _points(n: int, seed: int = 0, dataset: str = "ds") -> tuple[np.ndarray, list[search_pb2.Point]]:
    vectors, labels = clustered(n, DIM, seed=seed)
    return vectors, [point_message(v, dataset, f"c{c}/img{i}.jpg", [f"c{c}"]) for i, (v, c) in
                     enumerate(zip(vectors, labels, strict=True))]


def _create(stub: Stub, name: str, n: int = 100) -> np.ndarray:
    stub.CreateCollection(search_pb2.CreateCollectionRequest(name=name, dim=DIM, model="m", dataset="ds"))
    vectors, points = _points(n)
    acks = list(stub.Upsert(upsert_messages(name, points, max_points=40)))
    assert [a.sequence for a in acks] == list(range(len(acks))) and sum(a.upserted for a in acks) == n
    return vectors


def test_collections_over_the_wire(server: tuple[RunningServer, SearchCore, Stub]) -> None:
    _, _, stub = server
    created = stub.CreateCollection(search_pb2.CreateCollectionRequest(name="c1", dim=DIM, model="m", dataset="ds"))
    assert (created.collection.name, created.collection.dim, created.collection.points_count) == ("c1", DIM, 0)
    request = search_pb2.CreateCollectionRequest
    assert _code(lambda: stub.CreateCollection(request(name="c1", dim=DIM)))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert stub.CreateCollection(request(name="c1", dim=DIM, exist_ok=True)).collection.model == "m"
    code, details = _code(lambda: stub.CreateCollection(request(name="c1", dim=8, exist_ok=True)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details == f"collection 'c1' exists with dim {DIM}, not 8"
    assert _code(lambda: stub.CreateCollection(request(name="a/b", dim=8)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "c1" in [c.name for c in stub.ListCollections(search_pb2.ListCollectionsRequest()).collections]
    stub.DeleteCollection(search_pb2.DeleteCollectionRequest(name="c1"))
    code, details = _code(lambda: stub.GetCollection(search_pb2.GetCollectionRequest(name="c1")))
    assert code == grpc.StatusCode.NOT_FOUND and details == "no collection or alias named 'c1'"


def test_upsert_stream_and_queries(server: tuple[RunningServer, SearchCore, Stub]) -> None:
    _, _, stub = server
    vectors = _create(stub, "q1", 100)
    info = stub.GetCollection(search_pb2.GetCollectionRequest(name="q1")).collection
    assert info.points_count == 100 and info.status in (search_pb2.INDEX_STATUS_GREEN, search_pb2.INDEX_STATUS_YELLOW)

    request = search_pb2.SearchRequest(collection="q1", vector=vectors[0].tolist(), limit=5, exact=True,
                                       with_payload=True, with_vector=True)
    hits = stub.Search(request).hits
    assert hits[0].id == point_id("ds", hits[0].payload.path) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload.path.endswith("/img0.jpg") and len(hits[0].vector) == DIM
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    filtered = stub.Search(search_pb2.SearchRequest(
        collection="q1", vector=vectors[0].tolist(), limit=50, with_payload=True,
        filter=search_pb2.Filter(labels_any=["c1", "c2"], path_prefix="c1/"), exclude_ids=[hits[1].id])).hits
    assert filtered and all(h.payload.path.startswith("c1/") for h in filtered)
    assert hits[1].id not in [h.id for h in filtered]

    by_id = stub.SearchById(search_pb2.SearchByIdRequest(collection="q1", id=hits[0].id, limit=4, exact=True)).hits
    assert [h.id for h in by_id] == [h.id for h in hits[1:5]]
    batch = stub.SearchBatch(search_pb2.SearchBatchRequest(queries=[request, request])).results
    assert [h.id for h in batch[1].hits] == [h.id for h in hits]

    assert stub.Count(search_pb2.CountRequest(collection="q1")).count == 100
    page = stub.Scroll(search_pb2.ScrollRequest(collection="q1", limit=30, with_vector=True))
    assert len(page.points) == 30 and page.next_offset and len(page.points[0].vector) == DIM
    rest = stub.Scroll(search_pb2.ScrollRequest(collection="q1", limit=100, offset=page.next_offset))
    assert len(rest.points) == 70 and rest.next_offset == ""
    deleted = stub.Delete(search_pb2.DeleteRequest(collection="q1", ids=[hits[0].id, point_id("ds", "none")]))
    assert deleted.deleted == 1 and stub.Count(search_pb2.CountRequest(collection="q1")).count == 99


def test_upsert_errors_have_precise_codes(server: tuple[RunningServer, SearchCore, Stub]) -> None:
    _, _, stub = server
    _create(stub, "e1", 10)
    _, points = _points(80, seed=1, dataset="other")  # ids distinct from _create's
    big = search_pb2.UpsertRequest(collection="e1", points=points[:60])  # ~6 KiB: within the limits
    too_many = search_pb2.UpsertRequest(collection="e1", points=points[:65])
    code, details = _code(lambda: list(stub.Upsert(iter([too_many]))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "65 points; at most 64" in details
    heavy = [point_message(np.ones(DIM), "ds", "x" * 400 + str(i)) for i in range(40)]
    # The first message is acknowledged (and durable) before the second one ends the stream.
    stream = stub.Upsert(iter([big, search_pb2.UpsertRequest(points=heavy)]))
    first = next(stream)
    assert (first.sequence, first.upserted) == (0, 60)
    code, details = _code(lambda: next(stream))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("upsert message 1: ") and "at most 16384 bytes per message" in details
    assert stub.Count(search_pb2.CountRequest(collection="e1")).count == 70

    wrong = search_pb2.UpsertRequest(collection="e1", points=[point_message(np.ones(8), "ds", "w.jpg")])
    code, details = _code(lambda: list(stub.Upsert(iter([wrong]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"upsert message 0, point 0 of 1: vector has 8 values, collection 'e1' has dim {DIM}"
    nan = search_pb2.UpsertRequest(collection="e1", points=[point_message(np.full(DIM, np.nan), "ds", "n.jpg")])
    assert "non-finite value (nan) at index 0" in _code(lambda: list(stub.Upsert(iter([nan]))))[1]
    unknown = search_pb2.UpsertRequest(collection="nope", points=points[:1])
    assert _code(lambda: list(stub.Upsert(iter([unknown]))))[0] == grpc.StatusCode.NOT_FOUND
    nameless = search_pb2.UpsertRequest(points=points[:1])
    assert _code(lambda: list(stub.Upsert(iter([nameless]))))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert list(stub.Upsert(iter([]))) == []  # nothing sent, nothing acknowledged
    code, details = _code(lambda: stub.Search(search_pb2.SearchRequest(
        collection="e1", vector=[1.0] * DIM, limit=3, filter=search_pb2.Filter(labels_any=[""]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "search: filter.labels_any[0] is empty"
    assert _code(lambda: stub.SearchById(search_pb2.SearchByIdRequest(collection="e1", id="x", limit=3)))[0] \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_alias_swap_over_the_wire(server: tuple[RunningServer, SearchCore, Stub]) -> None:
    _, _, stub = server
    _create(stub, "v1", 20)
    stub.CreateCollection(search_pb2.CreateCollectionRequest(name="v2", dim=8))
    stub.SetAlias(search_pb2.SetAliasRequest(alias="live", collection="v1"))
    assert stub.Count(search_pb2.CountRequest(collection="live")).count == 20
    stub.SetAlias(search_pb2.SetAliasRequest(alias="live", collection="v2"))
    assert stub.GetCollection(search_pb2.GetCollectionRequest(name="live")).collection.dim == 8
    assert [(a.alias, a.collection) for a in stub.ListAliases(search_pb2.ListAliasesRequest()).aliases] \
        == [("live", "v2")]
    stub.DeleteAlias(search_pb2.DeleteAliasRequest(alias="live"))
    assert _code(lambda: stub.DeleteAlias(search_pb2.DeleteAliasRequest(alias="live")))[0] == grpc.StatusCode.NOT_FOUND


def test_health_reflection_and_metrics(server: tuple[RunningServer, SearchCore, Stub]) -> None:
    running, _, stub = server
    _create(stub, "m1", 30)
    stub.Search(search_pb2.SearchRequest(collection="m1", vector=[1.0] * DIM, limit=3))
    chan = channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(chan)
    for service in ("", "retrieval.v1.SearchService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(chan)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "retrieval.v1.SearchService" in [s.name for s in answer.list_services_response.service]
    chan.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    assert 'search_points_total{collection="m1"} 30.0' in text
    assert 'search_upserted_points_total{collection="m1"} 30.0' in text
    assert 'search_query_duration_seconds_count{operation="search"}' in text
    assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="Search",grpc_service="retrieval.v1.SearchService",'
            'grpc_type="unary"}') in text


@pytest.mark.parametrize("prefer_grpc", [True, False], ids=["grpc", "rest"])
def test_unreachable_server_backend_is_not_serving_and_unavailable(prefer_grpc: bool) -> None:
    settings = SearchSettings(backend="server", url="http://127.0.0.1:9", grpc_port=9, prefer_grpc=prefer_grpc,
                              port=0, metrics_port=-1, health_interval=0.2, qdrant_timeout=2)
    running, core = create_search_server(settings, QdrantStore.from_settings(settings))
    chan = channel(f"127.0.0.1:{running.port}")
    try:
        health = health_pb2_grpc.HealthStub(chan)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = _code(lambda: search_pb2_grpc.SearchServiceStub(chan).ListCollections(
            search_pb2.ListCollectionsRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("list aliases: Qdrant")
    finally:
        chan.close()
        running.stop(0)
        core.close()
