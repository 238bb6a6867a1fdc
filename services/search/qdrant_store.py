"""``VectorStore`` on ``qdrant-client``: a Qdrant server or cluster by URL, or qdrant-client's local mode.

Local mode (``QdrantClient(location=":memory:")`` or ``path=``) speaks the server's API in-process
(brute force, no indexes) and stands in for a server in tests. Collection metadata (model, dataset)
lives in Qdrant's collection ``metadata``; aliases are Qdrant's own, switched in one
``update_collection_aliases`` call, which the server applies atomically.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from services.search.config import SearchSettings
from services.search.store import (
    CollectionMeta,
    CollectionStats,
    Filter,
    Hit,
    IndexParams,
    IndexStatus,
    Payload,
    Point,
    Query,
)

_T = TypeVar("_T")

_STATUS = {
    models.CollectionStatus.GREEN: IndexStatus.GREEN,
    models.CollectionStatus.YELLOW: IndexStatus.YELLOW,
    models.CollectionStatus.GREY: IndexStatus.YELLOW,  # optimisations pending, not started yet
    models.CollectionStatus.RED: IndexStatus.RED,
}
_GRPC_CODES: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def translate(exc: Exception, what: str) -> ServiceError:
    """The domain error for an exception of qdrant-client (server over REST or gRPC, or local mode)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, UnexpectedResponse):
        status = exc.status_code or 0
        detail = exc.content.decode("utf-8", "replace")[:500]
        if status == 404:
            return NotFound(f"{what}: {detail}")
        if status == 409:
            return AlreadyExists(f"{what}: {detail}")
        if status in (400, 422):
            return InvalidArgument(f"{what}: {detail}")
        if status in (401, 403):
            return Internal(f"{what}: Qdrant rejected the service's credentials (HTTP {status})")
        return Unavailable(f"{what}: Qdrant answered HTTP {status}: {detail}")
    if isinstance(exc, grpc.RpcError):
        code = exc.code()
        cls = _GRPC_CODES.get(code, Internal)
        return cls(f"{what}: Qdrant: {code.name}: {exc.details()}")
    if isinstance(exc, ResponseHandlingException | httpx.TransportError | ConnectionError | TimeoutError):
        return Unavailable(f"{what}: Qdrant unreachable: {exc}")
    if isinstance(exc, ValueError):  # local mode reports every refusal as ValueError
        message = str(exc)
        if "not found" in message:
            return NotFound(f"{what}: {message}")
        if "already exists" in message:
            return AlreadyExists(f"{what}: {message}")
        return InvalidArgument(f"{what}: {message}")
    if isinstance(exc, RuntimeError) and "closed" in str(exc):
        return Unavailable(f"{what}: {exc}")
    return Internal(f"{what}: {type(exc).__name__}: {exc}")


def qdrant_filter(flt: Filter | None, exclude_ids: Sequence[str] = ()) -> models.Filter | None:
    """The Qdrant filter for payload conditions and excluded ids (None when there is neither)."""
    must: list[models.Condition] = []
    if flt is not None:
        if flt.labels_any:
            must.append(models.FieldCondition(key="labels", match=models.MatchAny(any=list(flt.labels_any))))
        if flt.dataset:
            must.append(models.FieldCondition(key="dataset", match=models.MatchValue(value=flt.dataset)))
        if flt.path_prefix:
            must.append(models.FieldCondition(key="path", match=models.MatchPrefix(prefix=flt.path_prefix)))
    must_not: list[models.Condition] = [models.HasIdCondition(has_id=list(exclude_ids))] if exclude_ids else []
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)


def _vector(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


@dataclass(frozen=True)
class ClusterParams:
    """How a new collection is laid out over a Qdrant cluster; None leaves the server's default.

    Attributes:
        shard_number: shards of the collection. Fixed at creation: without it Qdrant takes the number of
            peers at that moment, and the collection cannot spread over peers added later without resharding.
        replication_factor: copies of each shard (each on a different peer).
        write_consistency_factor: replicas that must acknowledge a write before it is answered.
    """

    shard_number: int | None = None
    replication_factor: int | None = None
    write_consistency_factor: int | None = None

    @classmethod
    def from_settings(cls, settings: SearchSettings) -> ClusterParams:
        """The layout given by SEARCH_SHARD_NUMBER, SEARCH_REPLICATION_FACTOR, SEARCH_WRITE_CONSISTENCY_FACTOR."""
        return cls(shard_number=settings.shard_number, replication_factor=settings.replication_factor,
                   write_consistency_factor=settings.write_consistency_factor)


class QdrantStore:
    """Collections in a Qdrant server (or qdrant-client local mode)."""

    backend = "server"

    def __init__(self, client: QdrantClient, params: IndexParams | None = None, *,
                 alias_cache_seconds: float = 1.0, serialize: bool = False, local: bool = False,
                 cluster: ClusterParams | None = None) -> None:
        """Wraps a client.

        Args:
            client: a QdrantClient (remote, or local mode).
            params: HNSW parameters of new collections and the search ``ef``.
            alias_cache_seconds: how long a name's resolution (alias -> collection -> dim) is reused.
            serialize: one call at a time (local mode is not thread-safe; a server is).
            local: the client is local mode (no payload indexes, no optimizer to wait for).
            cluster: shard number, replication and write consistency of new collections.
        """
        self.client = client
        self.params = params or IndexParams()
        self.cluster = cluster or ClusterParams()
        self._ttl = alias_cache_seconds
        self._local = local
        self._serial = threading.Lock() if serialize else None
        self._cache: dict[str, tuple[float, CollectionMeta]] = {}
        self._aliases_cache: tuple[float, dict[str, str]] | None = None

    @classmethod
    def local_mode(cls, path: str | None = None, params: IndexParams | None = None) -> QdrantStore:
        """A store on qdrant-client's local mode, in memory (``path`` None) or persisted in ``path``."""
        client = QdrantClient(location=":memory:") if path is None else QdrantClient(path=path)
        return cls(client, params, alias_cache_seconds=0.0, serialize=True, local=True)

    @classmethod
    def from_settings(cls, settings: SearchSettings) -> QdrantStore:
        """A store on the Qdrant server at ``settings.url`` (gRPC when ``prefer_grpc``)."""
        client = QdrantClient(url=settings.url, api_key=settings.api_key, https=settings.https,
                              prefer_grpc=settings.prefer_grpc, grpc_port=settings.grpc_port,
                              timeout=max(1, round(settings.qdrant_timeout)),
                              check_compatibility=False)  # reachability is the health monitor's job
        params = IndexParams(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct, ef=settings.hnsw_ef,
                             indexing_threshold_kb=settings.indexing_threshold_kb)
        return cls(client, params, alias_cache_seconds=settings.alias_cache_seconds,
                   cluster=ClusterParams.from_settings(settings))

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        if self._serial is None:
            yield
        else:
            with self._serial:
                yield

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            with self._serialized():
                return fn()
        except Exception as exc:
            raise translate(exc, what) from exc

    def _invalidate(self) -> None:
        self._cache.clear()
        self._aliases_cache = None

    def close(self) -> None:
        self._call("close", self.client.close)

    def ping(self) -> None:
        self._call("ping", self.client.get_collections)

    # -- collections and aliases ------------------------------------------------------------------

    def create_collection(self, meta: CollectionMeta) -> None:
        if meta.name in self.list_aliases():
            raise AlreadyExists(f"{meta.name!r} is an alias of collection {self.list_aliases()[meta.name]!r}")
        p, c = self.params, self.cluster
        what = f"create collection {meta.name!r}"
        self._invalidate()
        self._call(what, lambda: self.client.create_collection(
            meta.name,
            vectors_config=models.VectorParams(size=meta.dim, distance=models.Distance.COSINE),
            # exact_only: m=0 and indexing off tell Qdrant never to build the HNSW graph.
            hnsw_config=models.HnswConfigDiff(m=0 if meta.exact_only else p.m, ef_construct=p.ef_construct,
                                              full_scan_threshold=10_000),
            optimizers_config=models.OptimizersConfigDiff(
                indexing_threshold=0 if meta.exact_only else p.indexing_threshold_kb),
            # None keeps the server's default; local mode accepts these and ignores them (one process).
            shard_number=c.shard_number,
            replication_factor=c.replication_factor,
            write_consistency_factor=c.write_consistency_factor,
            metadata={"model": meta.model, "dataset": meta.dataset, "exact_only": meta.exact_only},
        ))
        indexes: list[tuple[str, models.PayloadSchemaType | models.KeywordIndexParams]] = [
            ("dataset", models.PayloadSchemaType.KEYWORD),
            ("labels", models.PayloadSchemaType.KEYWORD),
            ("path", models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, prefix=True)),
        ]
        with warnings.catch_warnings():
            # Local mode warns that payload indexes have no effect there; a server builds them.
            warnings.simplefilter("ignore", UserWarning)
            for field, schema in indexes:
                self._create_index(meta.name, field, schema)

    def _create_index(self, name: str, field: str,
                      schema: models.PayloadSchemaType | models.KeywordIndexParams) -> None:
        self._call(f"create collection {name!r}: payload index {field!r}",
                   lambda: self.client.create_payload_index(name, field, field_schema=schema, wait=True))

    def delete_collection(self, name: str) -> bool:
        if not self._call(f"collection {name!r}", lambda: self.client.collection_exists(name)):
            return False
        if name in self.list_aliases():
            return False  # an alias, not a collection
        self._invalidate()
        # Qdrant removes the collection's aliases with it.
        self._call(f"delete collection {name!r}", lambda: self.client.delete_collection(name))
        return True

    def _meta(self, name: str) -> CollectionMeta:
        info = self._call(f"collection {name!r}", lambda: self.client.get_collection(name))
        vectors = info.config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise FailedPrecondition(f"collection {name!r} has named vectors; it was not created by this service")
        metadata = info.config.metadata or {}
        return CollectionMeta(name=name, dim=vectors.size, model=str(metadata.get("model") or ""),
                              dataset=str(metadata.get("dataset") or ""),
                              exact_only=bool(metadata.get("exact_only", False)))

    def list_collections(self) -> list[CollectionMeta]:
        names = self._call("list collections", lambda: [c.name for c in self.client.get_collections().collections])
        return [self._meta(name) for name in sorted(names)]

    def resolve(self, name: str) -> CollectionMeta:
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        target = self.list_aliases().get(name, name)
        try:
            meta = self._meta(target)
        except NotFound:
            raise NotFound(f"no collection or alias named {name!r}") from None
        self._cache[name] = (now + self._ttl, meta)
        return meta

    def stats(self, name: str) -> CollectionStats:
        info = self._call(f"collection {name!r}", lambda: self.client.get_collection(name))
        count = self.count(name, None)
        return CollectionStats(points_count=count, status=_STATUS.get(info.status, IndexStatus.RED))

    def set_alias(self, alias: str, collection: str) -> None:
        current = self._call("list aliases", self.client.get_aliases).aliases
        if any(a.alias_name == alias and a.collection_name == collection for a in current):
            return
        if not self._call(f"collection {collection!r}", lambda: self.client.collection_exists(collection)) \
                or collection in {a.alias_name for a in current}:
            raise NotFound(f"no collection named {collection!r}")
        if self._call(f"collection {alias!r}", lambda: self.client.collection_exists(alias)) \
                and alias not in {a.alias_name for a in current}:
            raise AlreadyExists(f"{alias!r} is a collection; an alias cannot take its name")
        operations: list[models.AliasOperations] = []
        if any(a.alias_name == alias for a in current):
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        operations.append(models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
        self._invalidate()
        # One request: the server switches the alias atomically.
        self._call(f"set alias {alias!r}", lambda: self.client.update_collection_aliases(operations))

    def delete_alias(self, alias: str) -> bool:
        if alias not in self.list_aliases():
            return False
        self._invalidate()
        self._call(f"delete alias {alias!r}", lambda: self.client.update_collection_aliases(
            [models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))]))
        return True

    def list_aliases(self) -> dict[str, str]:
        now = time.monotonic()
        if self._aliases_cache is not None and self._aliases_cache[0] > now:
            return dict(self._aliases_cache[1])
        aliases = {a.alias_name: a.collection_name
                   for a in self._call("list aliases", self.client.get_aliases).aliases}
        self._aliases_cache = (now + self._ttl, aliases)
        return dict(aliases)

    # -- points ----------------------------------------------------------------------------------

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        structs = [models.PointStruct(id=p.id, vector=p.vector.tolist(), payload=p.payload.to_dict())
                   for p in points]
        # wait=True: answered once the server has the operation in its WAL and applied it.
        self._call(f"upsert into {collection!r}", lambda: self.client.upsert(collection, structs, wait=True))

    def sync(self, collection: str) -> None:
        """Nothing to do: the server acknowledged the write (wait=True) after its own WAL write."""

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        selector = models.PointIdsList(points=list(ids))
        self._call(f"delete from {collection!r}", lambda: self.client.delete(collection, selector, wait=True))

    def retrieve(self, collection: str, ids: Sequence[str], with_vector: bool) -> list[Point]:
        records = self._call(f"retrieve from {collection!r}", lambda: self.client.retrieve(
            collection, list(ids), with_payload=True, with_vectors=with_vector))
        return [Point(id=str(r.id), vector=_vector(r.vector) if with_vector else np.empty(0, np.float32),
                      payload=Payload.from_dict(r.payload)) for r in records]

    def stored_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        records = self._call(f"retrieve from {collection!r}", lambda: self.client.retrieve(
            collection, list(ids), with_payload=False, with_vectors=True))
        return {str(r.id): _vector(r.vector) for r in records}

    def _request(self, query: Query) -> models.QueryRequest:
        return models.QueryRequest(
            query=query.vector.tolist(),
            filter=qdrant_filter(query.filter, query.exclude_ids),
            # Local mode always searches exactly (and warns about search params).
            params=None if self._local else models.SearchParams(hnsw_ef=self.params.search_ef(query.limit),
                                                                 exact=query.exact),
            limit=query.limit,
            with_payload=query.with_payload,
            with_vector=query.with_vector,
        )

    def query(self, collection: str, queries: Sequence[Query]) -> list[list[Hit]]:
        requests = [self._request(q) for q in queries]
        what = f"search {collection!r}"
        if len(requests) == 1:
            q = queries[0]
            r = requests[0]
            responses = [self._call(what, lambda: self.client.query_points(
                collection, query=r.query, query_filter=r.filter, search_params=r.params, limit=q.limit,
                with_payload=q.with_payload, with_vectors=q.with_vector))]
        else:
            responses = self._call(what, lambda: self.client.query_batch_points(collection, requests))
        return [[Hit(id=str(p.id), score=float(p.score),
                     payload=Payload.from_dict(p.payload) if q.with_payload else None,
                     vector=_vector(p.vector) if q.with_vector else None) for p in response.points]
                for q, response in zip(queries, responses, strict=True)]

    def count(self, collection: str, filter: Filter | None) -> int:
        result = self._call(f"count {collection!r}", lambda: self.client.count(
            collection, count_filter=qdrant_filter(filter), exact=True))
        return int(result.count)

    def scroll(self, collection: str, filter: Filter | None, limit: int, offset: str | None,
               with_vector: bool) -> tuple[list[Point], str | None]:
        records, next_offset = self._call(f"scroll {collection!r}", lambda: self.client.scroll(
            collection, scroll_filter=qdrant_filter(filter), limit=limit, offset=offset, with_payload=True,
            with_vectors=with_vector))
        points = [Point(id=str(r.id), vector=_vector(r.vector) if with_vector else np.empty(0, np.float32),
                        payload=Payload.from_dict(r.payload)) for r in records]
        return points, (str(next_offset) if next_offset is not None else None)

    def optimize(self, collection: str, timeout: float = 600.0) -> None:
        """Waits until the server reports the collection GREEN (local mode: at once)."""
        if self._local:
            return
        end = time.monotonic() + timeout
        while self.stats(collection).status != IndexStatus.GREEN:
            if time.monotonic() > end:
                raise Unavailable(f"collection {collection!r} not indexed after {timeout:.0f} s")
            time.sleep(0.2)
