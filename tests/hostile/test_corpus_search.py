"""Hand-made bad requests to the search service (dim 8; at most 16 points a message, limit 100, 8 queries
and 200 hits a batch, 6 collections, 32 ids a delete), each with the code and message it must get."""

from __future__ import annotations

import grpc
import pytest
from retrieval.v1 import search_pb2, search_pb2_grpc

from tests.hostile.corpus import Bad, check
from tests.hostile.servers import REF, SCRATCH, Platform, ref_ids, ref_vectors
from tests.hostile.wire import length_delimited

C = grpc.StatusCode
S = search_pb2
VEC = ref_vectors()[0].tolist()
NAN = [1.0, 2.0, float("nan"), *([0.5] * 5)]
POINT = S.Point(vector=VEC, payload=S.Payload(dataset="corpus", path="a.jpg"))
LONG = "n" * 100_000


def _search(vector: list[float], **fields: object) -> S.SearchRequest:
    return S.SearchRequest(collection=REF, vector=vector, **{"limit": 5, **fields})  # type: ignore[arg-type]


CORPUS = {
    "non-UTF-8 collection name": Bad("search.GetCollection", (length_delimited(1, b"re\xfff"),), C.INVALID_ARGUMENT,
                                     "the request is not a valid retrieval.v1.GetCollectionRequest"),
    "collection name of 100 KB": Bad("search.CreateCollection", (S.CreateCollectionRequest(name=LONG, dim=8),),
                                     C.INVALID_ARGUMENT, "is not a valid name"),
    "unknown collection of 100 KB": Bad("search.GetCollection", (S.GetCollectionRequest(name=LONG),), C.NOT_FOUND,
                                        "no collection or alias named"),
    "NaN in a query vector": Bad("search.Search", (_search(NAN),), C.INVALID_ARGUMENT,
                                 "search: vector has a non-finite value (nan) at index 2"),
    "inf in an upserted vector": Bad(
        "search.Upsert", (S.UpsertRequest(collection=SCRATCH, points=[S.Point(
            vector=[float("inf"), *VEC[1:]], payload=POINT.payload)]),),
        C.INVALID_ARGUMENT, "upsert message 0, point 0 of 1: vector has a non-finite value (inf) at index 0"),
    "wrong-dimension vector": Bad("search.Search", (_search([1.0, 2.0, 3.0]),), C.INVALID_ARGUMENT,
                                  f"search: vector has 3 values, collection '{REF}' has dim 8"),
    "all-zero vector": Bad("search.Search", (_search([0.0] * 8),), C.INVALID_ARGUMENT, "vector is all zeros"),
    "vector whose norm overflows": Bad("search.Search", (_search([3e38] * 8),), C.INVALID_ARGUMENT,
                                       "vector norm overflows float32"),
    "bad point id": Bad("search.Delete", (S.DeleteRequest(collection=SCRATCH, ids=["not-a-uuid"]),),
                        C.INVALID_ARGUMENT, "ids[0]: 'not-a-uuid' is not a point id (a UUID string)"),
    "bad excluded id": Bad("search.Search", (_search(VEC, exclude_ids=[ref_ids()[0], "x"]),), C.INVALID_ARGUMENT,
                           "search: exclude_ids[1]: 'x' is not a point id"),
    "query by a point that is not there": Bad(
        "search.SearchById", (S.SearchByIdRequest(collection=REF, id="00000000-0000-0000-0000-000000000001",
                                                  limit=3),),
        C.NOT_FOUND, f"no point 00000000-0000-0000-0000-000000000001 in collection '{REF}'"),
    "SearchBatch asking for too many hits": Bad("search.SearchBatch", (S.SearchBatchRequest(
        queries=[_search(VEC, limit=100)] * 3),), C.RESOURCE_EXHAUSTED,
        "search batch: 3 queries asking for 300 hits in all; at most 200"),
    "SearchBatch of too many queries": Bad("search.SearchBatch", (S.SearchBatchRequest(queries=[_search(VEC)] * 9),),
                                           C.RESOURCE_EXHAUSTED, "search batch: 9 queries; at most 8 per request"),
    "limit 0": Bad("search.Search", (_search(VEC, limit=0),), C.INVALID_ARGUMENT,
                   "search: limit 0 is not between 1 and 100"),
    "scroll page over the limit": Bad("search.Scroll", (S.ScrollRequest(collection=REF, limit=101),),
                                      C.INVALID_ARGUMENT, "scroll: limit 101 is not between 1 and 100"),
    "empty label in a filter": Bad("search.Count", (S.CountRequest(collection=REF, filter=S.Filter(
        labels_any=["c0", ""])),), C.INVALID_ARGUMENT, "count: filter.labels_any[1] is empty"),
    "too many ids to delete": Bad("search.Delete", (S.DeleteRequest(collection=SCRATCH, ids=ref_ids()[:33]),),
                                  C.RESOURCE_EXHAUSTED, "delete: 33 ids; at most 32 per request"),
    "deleting an alias as a collection": Bad("search.DeleteCollection", (S.DeleteCollectionRequest(name="al"),),
                                             C.FAILED_PRECONDITION, f"'al' is an alias of collection '{SCRATCH}'"),
    "an existing collection with another dim": Bad(
        "search.CreateCollection", (S.CreateCollectionRequest(name=REF, dim=9),), C.FAILED_PRECONDITION,
        f"collection '{REF}' exists with dim 8, not 9"),
    "an existing collection": Bad("search.CreateCollection", (S.CreateCollectionRequest(name=REF, dim=8),),
                                  C.ALREADY_EXISTS, f"collection '{REF}' already exists"),
    "too many points in an upsert message": Bad(
        "search.Upsert", (S.UpsertRequest(collection=SCRATCH, points=[POINT] * 17),), C.RESOURCE_EXHAUSTED,
        "upsert message 0: 17 points; at most 16 per message"),
    "an upsert stream naming no collection": Bad("search.Upsert", (S.UpsertRequest(points=[POINT]),),
                                                 C.INVALID_ARGUMENT, "upsert message 0: the first message must name"),
    "a bad message in the middle of an upsert stream": Bad(
        "search.Upsert", (S.UpsertRequest(collection=SCRATCH, points=[POINT]),
                          length_delimited(2, length_delimited(3, length_delimited(2, b"\xff")))),
        C.INVALID_ARGUMENT, "stream message 1 is not a valid retrieval.v1.UpsertRequest"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_search_request(name: str, platform: Platform) -> None:
    check(CORPUS[name], platform)


def test_too_many_collections(platform: Platform) -> None:
    stub = search_pb2_grpc.SearchServiceStub(platform.channels["search"])
    md = platform.metadata("search")
    have = len(stub.ListCollections(S.ListCollectionsRequest(), metadata=md, timeout=30).collections)
    made = [f"corpus-{i}" for i in range(6 - have)]
    try:
        for name in made:
            stub.CreateCollection(S.CreateCollectionRequest(name=name, dim=4), metadata=md, timeout=30)
        check(Bad("search.CreateCollection", (S.CreateCollectionRequest(name="one-too-many", dim=4),),
                  C.RESOURCE_EXHAUSTED, "this server holds 6 collections, the limit (SEARCH_MAX_COLLECTIONS) is 6"),
              platform)
    finally:
        for name in made:
            stub.DeleteCollection(S.DeleteCollectionRequest(name=name), metadata=md, timeout=30)
