"""gRPC servicer of ``retrieval.v1.SearchService``: converts messages, the core does the work."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
import numpy as np
from prometheus_client import CollectorRegistry
from retrieval.v1 import search_pb2, search_pb2_grpc

from services.common.errors import ServiceError
from services.common.server import RunningServer, ServiceRegistration, create_server
from services.search.config import SearchSettings
from services.search.core import CollectionInfo, SearchCore
from services.search.edge_store import EdgeStore
from services.search.metrics import SearchMetrics
from services.search.qdrant_store import QdrantStore
from services.search.store import Filter, Hit, IndexParams, IndexStatus, Payload, Point, Query, QueryPart, VectorStore

log = logging.getLogger(__name__)

SERVICE = search_pb2.DESCRIPTOR.services_by_name["SearchService"]
_STATUS = {IndexStatus.GREEN: search_pb2.INDEX_STATUS_GREEN, IndexStatus.YELLOW: search_pb2.INDEX_STATUS_YELLOW,
           IndexStatus.RED: search_pb2.INDEX_STATUS_RED}


def to_payload(msg: search_pb2.Payload) -> Payload:
    return Payload(dataset=msg.dataset, path=msg.path, labels=tuple(msg.labels))


def payload_msg(payload: Payload) -> search_pb2.Payload:
    return search_pb2.Payload(dataset=payload.dataset, path=payload.path, labels=list(payload.labels))


def to_point(msg: search_pb2.Point) -> Point:
    return Point(id=msg.id, vector=np.asarray(msg.vector, dtype=np.float32), payload=to_payload(msg.payload))


def point_msg(point: Point, with_vector: bool) -> search_pb2.Point:
    return search_pb2.Point(id=point.id, payload=payload_msg(point.payload),
                            vector=point.vector.tolist() if with_vector else None)


def to_filter(msg: search_pb2.Filter) -> Filter:
    return Filter(labels_any=tuple(msg.labels_any), dataset=msg.dataset, path_prefix=msg.path_prefix)


def to_query(msg: search_pb2.SearchRequest) -> Query:
    return Query(vector=np.asarray(msg.vector, dtype=np.float32), limit=msg.limit,
                 filter=to_filter(msg.filter) if msg.HasField("filter") else None,
                 exclude_ids=tuple(msg.exclude_ids), exact=msg.exact, with_payload=msg.with_payload,
                 with_vector=msg.with_vector, point_id=msg.query_point_id,
                 parts=tuple(QueryPart(np.asarray(p.vector, dtype=np.float32), p.weight, p.point_id)
                             for p in msg.composed))


def hits_msg(hits: list[Hit]) -> search_pb2.SearchResponse:
    scored = search_pb2.ScoredPoint
    return search_pb2.SearchResponse(hits=[
        scored(id=h.id, score=h.score) if h.payload is None and h.vector is None  # the common case, lean
        else scored(id=h.id, score=h.score, payload=payload_msg(h.payload) if h.payload is not None else None,
                    vector=h.vector.tolist() if h.vector is not None else None)
        for h in hits])


def info_msg(info: CollectionInfo) -> search_pb2.CollectionInfo:
    return search_pb2.CollectionInfo(name=info.meta.name, dim=info.meta.dim, model=info.meta.model,
                                     dataset=info.meta.dataset, points_count=info.points_count,
                                     status=_STATUS[info.status], aliases=list(info.aliases),
                                     exact_only=info.meta.exact_only)


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """``SearchService`` over a ``SearchCore``."""

    def __init__(self, core: SearchCore) -> None:
        self.core = core

    def CreateCollection(self, request: search_pb2.CreateCollectionRequest,
                         context: grpc.ServicerContext) -> search_pb2.CreateCollectionResponse:
        info = self.core.create_collection(request.name, request.dim, request.model, request.dataset,
                                           exist_ok=request.exist_ok, exact_only=request.exact_only)
        return search_pb2.CreateCollectionResponse(collection=info_msg(info))

    def DeleteCollection(self, request: search_pb2.DeleteCollectionRequest,
                         context: grpc.ServicerContext) -> search_pb2.DeleteCollectionResponse:
        self.core.delete_collection(request.name)
        return search_pb2.DeleteCollectionResponse()

    def ListCollections(self, request: search_pb2.ListCollectionsRequest,
                        context: grpc.ServicerContext) -> search_pb2.ListCollectionsResponse:
        return search_pb2.ListCollectionsResponse(collections=[info_msg(i) for i in self.core.list_collections()])

    def GetCollection(self, request: search_pb2.GetCollectionRequest,
                      context: grpc.ServicerContext) -> search_pb2.GetCollectionResponse:
        return search_pb2.GetCollectionResponse(collection=info_msg(self.core.get_collection(request.name)))

    def SetAlias(self, request: search_pb2.SetAliasRequest,
                 context: grpc.ServicerContext) -> search_pb2.SetAliasResponse:
        self.core.set_alias(request.alias, request.collection)
        return search_pb2.SetAliasResponse()

    def DeleteAlias(self, request: search_pb2.DeleteAliasRequest,
                    context: grpc.ServicerContext) -> search_pb2.DeleteAliasResponse:
        self.core.delete_alias(request.alias)
        return search_pb2.DeleteAliasResponse()

    def ListAliases(self, request: search_pb2.ListAliasesRequest,
                    context: grpc.ServicerContext) -> search_pb2.ListAliasesResponse:
        aliases = sorted(self.core.list_aliases().items())
        return search_pb2.ListAliasesResponse(aliases=[search_pb2.Alias(alias=a, collection=c) for a, c in aliases])

    def Upsert(self, request_iterator: Iterator[search_pb2.UpsertRequest],
               context: grpc.ServicerContext) -> Iterator[search_pb2.UpsertResponse]:
        session = self.core.upsert_session()
        for sequence, request in enumerate(request_iterator):
            upserted = session.add(request.collection, [to_point(p) for p in request.points], request.ByteSize())
            yield search_pb2.UpsertResponse(upserted=upserted, sequence=sequence)

    def Delete(self, request: search_pb2.DeleteRequest, context: grpc.ServicerContext) -> search_pb2.DeleteResponse:
        return search_pb2.DeleteResponse(deleted=self.core.delete(request.collection, list(request.ids)))

    def Search(self, request: search_pb2.SearchRequest, context: grpc.ServicerContext) -> search_pb2.SearchResponse:
        return hits_msg(self.core.search(request.collection, to_query(request)))

    def SearchBatch(self, request: search_pb2.SearchBatchRequest,
                    context: grpc.ServicerContext) -> search_pb2.SearchBatchResponse:
        results = self.core.search_batch([(q.collection, to_query(q)) for q in request.queries])
        return search_pb2.SearchBatchResponse(results=[hits_msg(hits) for hits in results])

    def SearchById(self, request: search_pb2.SearchByIdRequest,
                   context: grpc.ServicerContext) -> search_pb2.SearchResponse:
        hits = self.core.search_by_id(
            request.collection, request.id, request.limit,
            filter=to_filter(request.filter) if request.HasField("filter") else None,
            exclude_ids=tuple(request.exclude_ids), exact=request.exact, with_payload=request.with_payload,
            with_vector=request.with_vector)
        return hits_msg(hits)

    def Count(self, request: search_pb2.CountRequest, context: grpc.ServicerContext) -> search_pb2.CountResponse:
        flt = to_filter(request.filter) if request.HasField("filter") else None
        return search_pb2.CountResponse(count=self.core.count(request.collection, flt))

    def Scroll(self, request: search_pb2.ScrollRequest, context: grpc.ServicerContext) -> search_pb2.ScrollResponse:
        flt = to_filter(request.filter) if request.HasField("filter") else None
        points, next_offset = self.core.scroll(request.collection, flt, request.limit, request.offset,
                                               request.with_vector)
        return search_pb2.ScrollResponse(points=[point_msg(p, request.with_vector) for p in points],
                                         next_offset=next_offset)


def open_store(settings: SearchSettings, metrics: SearchMetrics | None = None) -> VectorStore:
    """The store ``settings.backend`` names: Qdrant Edge in ``data_dir``, or the Qdrant server at ``url``."""
    if settings.backend == "server":
        return QdrantStore.from_settings(settings)
    params = IndexParams(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct, ef=settings.hnsw_ef,
                         indexing_threshold_kb=settings.indexing_threshold_kb)
    built = metrics.index_build_seconds.observe if metrics is not None else None
    return EdgeStore(settings.data_dir, params, search_threads=settings.search_threads,
                     index_idle_seconds=settings.index_idle_seconds,
                     scan_components_per_call=settings.scan_components_per_call,
                     search_niceness=settings.work_niceness,
                     exact_scan_max_bytes=settings.exact_scan_max_bytes,
                     on_index_built=(lambda _name, seconds: built(seconds)) if built else None)


def _watch_health(running: RunningServer, core: SearchCore, interval: float) -> None:
    """Reports SERVING while the store answers a ping, NOT_SERVING while it does not."""
    serving: bool | None = None
    while True:
        try:
            core.store.ping()
            ok = True
        except ServiceError as exc:
            ok = False
            if serving is not False:
                log.error("store unreachable: %s", exc.message)
        if ok != serving:
            running.set_serving(ok)
            if ok and serving is False:
                log.info("store reachable again")
            serving = ok
        if core.closed.wait(interval):
            return


def create_search_server(settings: SearchSettings,
                         store: VectorStore | None = None) -> tuple[RunningServer, SearchCore]:
    """Starts a search server; health is SERVING while the store is reachable.

    Args:
        settings: the search service's settings.
        store: the store to serve (tests inject one); by default ``open_store(settings)``, which for
            the edge backend opens every collection in ``data_dir`` (replaying write-ahead logs) first.

    Returns:
        The running server and its core; ``core.close()`` stops the health watcher and closes the store.
    """
    metrics_registry = CollectorRegistry()
    metrics = SearchMetrics(metrics_registry)
    core = SearchCore(settings, store if store is not None else open_store(settings, metrics), metrics)
    servicer = SearchServicer(core)
    try:
        running = create_server(
            settings,
            [ServiceRegistration(SERVICE, lambda srv: search_pb2_grpc.add_SearchServiceServicer_to_server(
                servicer, srv))],
            registry=metrics_registry,
        )
    except BaseException:
        core.close()
        raise
    threading.Thread(target=_watch_health, args=(running, core, settings.health_interval),
                     name="search-health", daemon=True).start()
    return running, core


def serve(settings: SearchSettings) -> int:
    """Runs the search server until SIGTERM/SIGINT; returns the process exit code."""
    try:
        running, core = create_search_server(settings)
    except ServiceError as exc:
        log.error("cannot start the search service: %s", exc.message)
        return 2
    where = settings.data_dir if settings.backend == "edge" else settings.url
    print(f"search listening on {settings.host}:{running.port} (backend {settings.backend}: {where}; "
          f"metrics :{running.metrics_port})", flush=True)
    try:
        running.wait_for_signal(settings.grace_seconds)
    finally:
        core.close()
    return 0
