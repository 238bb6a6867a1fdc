"""Every RPC of the platform as a fuzz target: how it is called, which codes it may answer, valid
requests to mutate, and what the generator should know about its fields."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from retrieval.v1 import encoder_pb2, evaluator_pb2, search_pb2

from services.common.server import HEALTH_SERVICE, REFLECTION_SERVICE
from tests.hostile import bad_images
from tests.hostile.servers import CLIP_MICRO, DIM, MICRO, NOT_LOADED, REF, SCRATCH, Platform, ref_ids, ref_vectors
from tests.hostile.wire import Hints

C = grpc.StatusCode
UNARY, SERVER_STREAM, BIDI = "unary", "server_stream", "bidi"
# Any RPC may get these: an undecodable or invalid request, a request over a limit, load shedding.
ALWAYS = frozenset({C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED})
ENCODER, SEARCH = "retrieval.v1.EncoderService", "retrieval.v1.SearchService"
EVALUATOR = "retrieval.v1.EvaluatorService"


@dataclass(frozen=True)
class Rpc:
    """One method of one server.

    Attributes:
        server: which of the platform's servers answers it ("encoder", "search", "evaluator").
        service, method: the full service name and the method name.
        request, response: the message classes.
        kind: UNARY, SERVER_STREAM or BIDI.
        codes: the status codes it may answer besides ``ALWAYS`` (never UNKNOWN, never INTERNAL).
        protect: collections its hints never name (it would change them: the fuzzers only read ``REF``
            and write to ``SCRATCH``).
    """

    server: str
    service: str
    method: str
    request: type[Message]
    response: type[Message]
    kind: str = UNARY
    codes: frozenset[grpc.StatusCode] = frozenset()
    protect: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.server}.{self.method}"

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def allowed(self) -> frozenset[grpc.StatusCode]:
        return ALWAYS | self.codes

    def protected(self, platform: Platform) -> bool:
        """Whether a caller without the right token is refused (health and reflection stay open)."""
        return platform.token(self.server) is not None and self.service not in (HEALTH_SERVICE, REFLECTION_SERVICE)


NF, FP, AE = C.NOT_FOUND, C.FAILED_PRECONDITION, C.ALREADY_EXISTS
RPCS: tuple[Rpc, ...] = (
    Rpc("encoder", ENCODER, "EmbedImages", encoder_pb2.EmbedImagesRequest, encoder_pb2.EmbedImagesResponse,
        codes=frozenset({NF, FP})),
    Rpc("encoder", ENCODER, "StreamEmbedImages", encoder_pb2.StreamEmbedImagesRequest,
        encoder_pb2.StreamEmbedImagesResponse, BIDI, frozenset({NF, FP})),
    Rpc("encoder", ENCODER, "EmbedTexts", encoder_pb2.EmbedTextsRequest, encoder_pb2.EmbedTextsResponse,
        codes=frozenset({NF, FP})),
    Rpc("encoder", ENCODER, "ListModels", encoder_pb2.ListModelsRequest, encoder_pb2.ListModelsResponse),
    Rpc("encoder", ENCODER, "GetModel", encoder_pb2.GetModelRequest, encoder_pb2.GetModelResponse,
        codes=frozenset({NF})),
    Rpc("search", SEARCH, "CreateCollection", search_pb2.CreateCollectionRequest, search_pb2.CreateCollectionResponse,
        codes=frozenset({AE, FP}), protect=(REF,)),
    Rpc("search", SEARCH, "DeleteCollection", search_pb2.DeleteCollectionRequest, search_pb2.DeleteCollectionResponse,
        codes=frozenset({NF, FP}), protect=(REF, SCRATCH)),
    Rpc("search", SEARCH, "ListCollections", search_pb2.ListCollectionsRequest, search_pb2.ListCollectionsResponse),
    Rpc("search", SEARCH, "GetCollection", search_pb2.GetCollectionRequest, search_pb2.GetCollectionResponse,
        codes=frozenset({NF})),
    Rpc("search", SEARCH, "SetAlias", search_pb2.SetAliasRequest, search_pb2.SetAliasResponse,
        codes=frozenset({NF, AE}), protect=(REF,)),
    Rpc("search", SEARCH, "DeleteAlias", search_pb2.DeleteAliasRequest, search_pb2.DeleteAliasResponse,
        codes=frozenset({NF}), protect=(REF,)),
    Rpc("search", SEARCH, "ListAliases", search_pb2.ListAliasesRequest, search_pb2.ListAliasesResponse),
    Rpc("search", SEARCH, "Upsert", search_pb2.UpsertRequest, search_pb2.UpsertResponse, BIDI, frozenset({NF}),
        protect=(REF,)),
    Rpc("search", SEARCH, "Delete", search_pb2.DeleteRequest, search_pb2.DeleteResponse, codes=frozenset({NF}),
        protect=(REF,)),
    Rpc("search", SEARCH, "Search", search_pb2.SearchRequest, search_pb2.SearchResponse, codes=frozenset({NF})),
    Rpc("search", SEARCH, "SearchBatch", search_pb2.SearchBatchRequest, search_pb2.SearchBatchResponse,
        codes=frozenset({NF})),
    Rpc("search", SEARCH, "SearchById", search_pb2.SearchByIdRequest, search_pb2.SearchResponse, codes=frozenset({NF})),
    Rpc("search", SEARCH, "Count", search_pb2.CountRequest, search_pb2.CountResponse, codes=frozenset({NF})),
    Rpc("search", SEARCH, "Scroll", search_pb2.ScrollRequest, search_pb2.ScrollResponse, codes=frozenset({NF})),
    Rpc("evaluator", EVALUATOR, "StartRun", evaluator_pb2.StartRunRequest, evaluator_pb2.StartRunResponse,
        codes=frozenset({NF})),
    Rpc("evaluator", EVALUATOR, "WatchRun", evaluator_pb2.WatchRunRequest, evaluator_pb2.WatchRunResponse,
        SERVER_STREAM, frozenset({NF})),
    Rpc("evaluator", EVALUATOR, "GetRun", evaluator_pb2.GetRunRequest, evaluator_pb2.GetRunResponse,
        codes=frozenset({NF})),
    Rpc("evaluator", EVALUATOR, "ListRuns", evaluator_pb2.ListRunsRequest, evaluator_pb2.ListRunsResponse),
    Rpc("evaluator", EVALUATOR, "CancelRun", evaluator_pb2.CancelRunRequest, evaluator_pb2.CancelRunResponse,
        codes=frozenset({NF, FP})),
    Rpc("search", HEALTH_SERVICE, "Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse,
        codes=frozenset({NF})),
    Rpc("evaluator", HEALTH_SERVICE, "Watch", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse,
        SERVER_STREAM),
    Rpc("search", REFLECTION_SERVICE, "ServerReflectionInfo", reflection_pb2.ServerReflectionRequest,
        reflection_pb2.ServerReflectionResponse, BIDI),
    Rpc("encoder", REFLECTION_SERVICE, "ServerReflectionInfo", reflection_pb2.ServerReflectionRequest,
        reflection_pb2.ServerReflectionResponse, BIDI),
)
BY_NAME = {rpc.name: rpc for rpc in RPCS}


def _images() -> list[encoder_pb2.Image]:
    return [encoder_pb2.Image(data=data, id=f"img{i}") for i, data in enumerate(bad_images.seed_images())]


def _seeds(platform: Platform) -> dict[str, Sequence[Message]]:
    images = _images()
    ids = ref_ids()
    vec = ref_vectors()[0].tolist()
    flt = search_pb2.Filter(labels_any=["c0", "c1"], dataset="ref-ds", path_prefix="p1")
    point = search_pb2.Point(vector=vec, payload=search_pb2.Payload(dataset="fz", path="a.jpg", labels=["c0"]))
    query = search_pb2.SearchRequest(collection=REF, vector=vec, limit=5, filter=flt, exclude_ids=ids[:2],
                                     with_payload=True)
    spec = evaluator_pb2.RunSpec(dataset=str(platform.dataset), models=[MICRO.id], tsne=False, ks=[1, 2],
                                 run_name="fuzz")
    run = platform.finished_run
    return {
        "encoder.EmbedImages": [encoder_pb2.EmbedImagesRequest(model=MICRO.id, images=images[i:i + 3])
                                for i in range(0, len(images), 3)]
        + [encoder_pb2.EmbedImagesRequest(images=images[:1])],
        "encoder.StreamEmbedImages": [encoder_pb2.StreamEmbedImagesRequest(model=MICRO.id, images=images[i:i + 2])
                                      for i in range(0, 6, 2)],
        "encoder.EmbedTexts": [encoder_pb2.EmbedTextsRequest(model=CLIP_MICRO.id,
                                                             texts=["a photo of a cat", "", "dog"]),
                               encoder_pb2.EmbedTextsRequest(model=MICRO.id, texts=["x"])],
        "encoder.ListModels": [encoder_pb2.ListModelsRequest()],
        "encoder.GetModel": [encoder_pb2.GetModelRequest(model=m) for m in (MICRO.id, CLIP_MICRO.id, NOT_LOADED, "")],
        "search.CreateCollection": [search_pb2.CreateCollectionRequest(name="fz-new", dim=DIM, model="m", dataset="d"),
                                    search_pb2.CreateCollectionRequest(name=SCRATCH, dim=DIM, exist_ok=True)],
        "search.DeleteCollection": [search_pb2.DeleteCollectionRequest(name="fz-new"),
                                    search_pb2.DeleteCollectionRequest(name="al")],
        "search.ListCollections": [search_pb2.ListCollectionsRequest()],
        "search.GetCollection": [search_pb2.GetCollectionRequest(name=n) for n in (REF, "al")],
        "search.SetAlias": [search_pb2.SetAliasRequest(alias="fz-alias", collection=SCRATCH)],
        "search.DeleteAlias": [search_pb2.DeleteAliasRequest(alias="fz-alias")],
        "search.ListAliases": [search_pb2.ListAliasesRequest()],
        "search.Upsert": [search_pb2.UpsertRequest(collection=SCRATCH, points=[point]),
                          search_pb2.UpsertRequest(points=[point, point]), search_pb2.UpsertRequest()],
        "search.Delete": [search_pb2.DeleteRequest(collection=SCRATCH, ids=ids[30:33])],
        "search.Search": [query, search_pb2.SearchRequest(collection=REF, query_point_id=ids[3], limit=3, exact=True,
                                                          with_vector=True)],
        "search.SearchBatch": [search_pb2.SearchBatchRequest(queries=[query, search_pb2.SearchRequest(
            collection="al", query_point_id=ids[4], limit=2)])],
        "search.SearchById": [search_pb2.SearchByIdRequest(collection=REF, id=ids[5], limit=4, filter=flt,
                                                           with_payload=True)],
        "search.Count": [search_pb2.CountRequest(collection=REF, filter=flt), search_pb2.CountRequest(collection="al")],
        "search.Scroll": [search_pb2.ScrollRequest(collection=REF, limit=5, offset=ids[6], filter=flt,
                                                   with_vector=True)],
        "evaluator.StartRun": [evaluator_pb2.StartRunRequest(spec=spec)],
        "evaluator.WatchRun": [evaluator_pb2.WatchRunRequest(run_id=run)],
        "evaluator.GetRun": [evaluator_pb2.GetRunRequest(run_id=run)],
        "evaluator.ListRuns": [evaluator_pb2.ListRunsRequest(page_size=2, page_token=platform.page_token)],
        "evaluator.CancelRun": [evaluator_pb2.CancelRunRequest(run_id=run)],
        "search.Check": [health_pb2.HealthCheckRequest(service=s) for s in ("", SEARCH)],
        "evaluator.Watch": [health_pb2.HealthCheckRequest(service=s) for s in ("", EVALUATOR)],
        "search.ServerReflectionInfo": _reflection(SEARCH, "retrieval/v1/search.proto", "retrieval.v1.SearchRequest"),
        "encoder.ServerReflectionInfo": _reflection(ENCODER, "retrieval/v1/encoder.proto", "retrieval.v1.Image"),
    }


def _reflection(service: str, filename: str, message: str) -> list[Message]:
    request = reflection_pb2.ServerReflectionRequest
    extension = reflection_pb2.ExtensionRequest(containing_type=message, extension_number=1)
    return [request(list_services=""), request(file_containing_symbol=service), request(file_by_filename=filename),
            request(all_extension_numbers_of_type=message), request(file_containing_extension=extension)]


def seeds(platform: Platform) -> dict[str, list[bytes]]:
    """Valid serialized requests of each RPC (by ``Rpc.name``)."""
    return {name: [m.SerializeToString() for m in messages] for name, messages in _seeds(platform).items()}


def _utf8(values: Sequence[str]) -> list[bytes]:
    return [v.encode() for v in values]


def hints(platform: Platform, protect: Sequence[str] = ()) -> Hints:
    """What the generator knows of the running platform: valid names, ids and limits, and their edges;
    the names in ``protect`` left out."""
    ids = ref_ids()
    uuid_forms = [ids[0].upper(), "{" + ids[1] + "}", "urn:uuid:" + ids[2], ids[3].replace("-", ""),
                  "00000000-0000-0000-0000-000000000000", "not-a-uuid", ids[4][:-1]]
    names = [REF, REF, REF, SCRATCH, "fz-new", "al", "fz-alias", "eval__x", "x" * 255, "x" * 256, "-x", "a/b", "..",
             "a" * 100_000]
    names = [n for n in names if n not in protect]
    root = str(platform.allowed_root)
    nested = base64.urlsafe_b64encode(b"[" * 50_000).decode()
    forged = base64.urlsafe_b64encode(b'[1e308, "zz"]').decode()
    images = [*bad_images.seed_images(), bad_images.truncated_jpeg(), bad_images.png_bomb(5000, 5000),
              bad_images.solid_png(1, 3000), bad_images.random_bytes(64), bad_images.noisy_png(300 * 1024),
              bad_images.png_bad_crc()]
    return Hints(
        strings={
            "model": _utf8([MICRO.id, CLIP_MICRO.id, NOT_LOADED, "", "openclip:ViT-S-32-alt/x",
                            "openclip:" + "x" * 300]),
            "models": _utf8([MICRO.id, MICRO.id, "nope", ""]),
            "data": images,
            "texts": _utf8(["a photo of a cat", "", "x" * 200, "x" * 201, "\u0000", "🙂" * 60, "a\u0301" * 90]),
            "name": _utf8(names), "collection": _utf8(names), "alias": _utf8(names),
            "id": _utf8([*ids[:6], *uuid_forms]), "ids": _utf8([*ids[20:30], *uuid_forms]),
            "exclude_ids": _utf8([*ids[:3], *uuid_forms]), "query_point_id": _utf8([*ids[:3], *uuid_forms]),
            "offset": _utf8([*ids[:3], *uuid_forms]),
            "Payload.dataset": _utf8(["fz", "ref-ds", ""]), "path": _utf8(["a.jpg", "b/c.png", "", "../x"]),
            "labels": _utf8(["c0", "c1", ""]), "labels_any": _utf8(["c0", "c2", ""]),
            "path_prefix": _utf8(["p", "p1", ""]), "Filter.dataset": _utf8(["ref-ds", ""]),
            "RunSpec.dataset": _utf8([str(platform.dataset), str(platform.dataset), root, root + "/../..", "/etc",
                                      str(platform.dataset / "list_of_images.txt"), root + "/missing", "tiny"]),
            "catalogue": _utf8(["", "list_of_images.txt", "../../etc/passwd"]),
            "queries": _utf8(["", "list_of_images.txt", "/etc/passwd"]),
            "protocol_name": _utf8(["", "", "leave_one_out", "catalogue_query", "nope"]),
            "run_name": _utf8(["", "fuzz", "../x", ".h", "x" * 65]), "dataset_name": _utf8(["", "tiny", "a/b"]),
            "run_id": _utf8([platform.finished_run, "", "0123456789ab", "../x"]),
            "page_token": _utf8([platform.page_token, "", "garbage", forged, nested]),
            "service": _utf8(["", SEARCH, ENCODER, EVALUATOR, HEALTH_SERVICE, "nope"]),
            "file_by_filename": _utf8(["retrieval/v1/search.proto", "google/rpc/status.proto", "nope.proto"]),
            "file_containing_symbol": _utf8([SEARCH, "retrieval.v1.Point", "retrieval.v1.Point.vector", "x."]),
            "containing_type": _utf8(["retrieval.v1.SearchRequest", "nope"]),
            "all_extension_numbers_of_type": _utf8(["retrieval.v1.SearchRequest", "google.protobuf.Any"]),
        },
        ints={"dim": [DIM, 0, 16, 65536, 65537], "limit": [1, 5, 100, 101, 0, 200],
              "page_size": [0, 1, 2, 1000, 1001], "ks": [1, 5, 1000, 1001, 0], "protocol": [0, 1, 2, 3],
              "exist_ok": [0, 1], "exact": [0, 1], "exact_only": [0, 1], "with_payload": [0, 1],
              "with_vector": [0, 1], "tsne": [0, 1]},
        counts={"images": [0, 1, 2, 3, 8, 9], "texts": [0, 1, 2, 8, 9], "points": [0, 1, 2, 16, 17],
                "queries": [0, 1, 2, 8, 9, 30], "vector": [DIM, DIM, 0, 1, DIM - 1, DIM + 1, 300],
                "labels": [0, 1, 2, 1024, 1025], "labels_any": [0, 1, 2, 1024, 1025],
                "ids": [0, 1, 2, 32, 33], "exclude_ids": [0, 1, 2, 32, 33], "models": [1, 1, 0, 2, 40],
                "ks": [0, 1, 2, 3, 40]},
    )

