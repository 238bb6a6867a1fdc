"""The search core: validates requests, resolves aliases, and runs them on a ``VectorStore``.

Plain Python, no gRPC: the servicer converts messages, tests and in-process users call this.
Every check happens before anything reaches the engine, so bad input gets a precise
``ServiceError`` ("upsert message 0, point 17 of 64: vector has 384 values, collection
'caltech101__efficientnet-lite0' has dim 1280") and never a half-applied write.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.vectors import compose
from services.search.config import SearchSettings
from services.search.metrics import SearchMetrics
from services.search.store import (
    CollectionMeta,
    Filter,
    Hit,
    IndexStatus,
    Point,
    Query,
    QueryPart,
    VectorStore,
    check_point_id,
    point_id,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MAX_DIM = 65_536  # Qdrant's largest dense vector
MAX_FILTER_LABELS = 1024
DEFAULT_SCROLL_LIMIT = 256
# Bytes a hit's payload (dataset, path, labels) is assumed to take in an answer, for the size bound.
PAYLOAD_BYTES_ESTIMATE = 160
# Queries excluding at most this many ids ask the engine for that many more hits and drop the
# excluded ones afterwards: an id filter makes an exact scan ~3x slower in Qdrant Edge (measured on
# 8,677 x 1280-d: 0.47 s against 0.17 s for 256 queries), and leave-one-out excludes one id per query.
POSTFILTER_MAX_EXCLUDED = 16
MAX_QUERY_PARTS = 8  # parts of one composed query


@dataclass(frozen=True)
class CollectionInfo:
    """A collection as the API reports it: what it is, how many points, index status, its aliases."""

    meta: CollectionMeta
    points_count: int
    status: IndexStatus
    aliases: tuple[str, ...] = ()


def check_name(name: str, what: str) -> str:
    """``name`` if it is a valid collection or alias name; InvalidArgument otherwise."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"{what} {name!r} is not a valid name: 1 to 255 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
    return name


def check_vector(vector: np.ndarray, meta: CollectionMeta, where: str) -> np.ndarray:
    """``vector`` as float32 if it fits the collection: right length, finite, not all zeros."""
    vec = np.asarray(vector, dtype=np.float32)
    if vec.ndim != 1 or vec.shape[0] != meta.dim:
        raise InvalidArgument(f"{where}: vector has {vec.size} values, collection {meta.name!r} has dim {meta.dim}")
    finite = np.isfinite(vec)
    if not finite.all():
        index = int(np.argmin(finite))
        raise InvalidArgument(f"{where}: vector has a non-finite value ({vec[index]}) at index {index}")
    with np.errstate(over="ignore"):  # an overflowing norm is refused below, not warned about
        norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        raise InvalidArgument(f"{where}: vector is all zeros (cosine similarity is undefined for it)")
    if not np.isfinite(norm):
        raise InvalidArgument(f"{where}: vector norm overflows float32 (values up to {np.abs(vec).max():.3g})")
    return vec


def check_filter(flt: Filter | None, where: str) -> Filter | None:
    """``flt`` if it is well formed (None and an empty filter both mean: no condition)."""
    if flt is None or flt.empty:
        return None
    if len(flt.labels_any) > MAX_FILTER_LABELS:
        raise InvalidArgument(f"{where}.labels_any has {len(flt.labels_any)} labels; at most {MAX_FILTER_LABELS}")
    for i, label in enumerate(flt.labels_any):
        if not label:
            raise InvalidArgument(f"{where}.labels_any[{i}] is empty")
    for field, value in (("dataset", flt.dataset), ("path_prefix", flt.path_prefix)):
        if "\0" in value:
            raise InvalidArgument(f"{where}.{field} contains a NUL character")
    return flt


class SearchCore:
    """Collections, aliases, upserts and queries over one ``VectorStore``."""

    def __init__(self, settings: SearchSettings, store: VectorStore, metrics: SearchMetrics | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._admin = threading.Lock()  # create/delete collection and alias changes, one at a time
        self.closed = threading.Event()
        if metrics is not None:
            metrics.watch_points(self.points_counts)

    def close(self) -> None:
        """Closes the store (idempotent); background watchers see ``closed`` set and stop."""
        if not self.closed.is_set():
            self.closed.set()
            self.store.close()

    @contextmanager
    def _timed(self, operation: str, write: bool = False) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.metrics is not None:
                histogram = self.metrics.write_seconds if write else self.metrics.query_seconds
                histogram.labels(operation).observe(time.perf_counter() - start)

    # -- collections -----------------------------------------------------------------------------

    def _info(self, meta: CollectionMeta, aliases: dict[str, str] | None = None) -> CollectionInfo:
        stats = self.store.stats(meta.name)
        aliases = self.store.list_aliases() if aliases is None else aliases
        return CollectionInfo(meta=meta, points_count=stats.points_count, status=stats.status,
                              aliases=tuple(sorted(a for a, c in aliases.items() if c == meta.name)))

    def create_collection(self, name: str, dim: int, model: str = "", dataset: str = "",
                          exist_ok: bool = False, exact_only: bool = False) -> CollectionInfo:
        """Creates a collection of ``dim``-d vectors (cosine distance).

        Raises:
            InvalidArgument: bad name or dim.
            AlreadyExists: it exists (and ``exist_ok`` is false), or ``name`` is an alias.
            FailedPrecondition: it exists with another dim, model or dataset.
        """
        check_name(name, "collection name")
        if not 1 <= dim <= MAX_DIM:
            raise InvalidArgument(f"collection {name!r}: dim {dim} is not between 1 and {MAX_DIM}")
        with self._admin:
            aliases = self.store.list_aliases()
            if name in aliases:
                raise AlreadyExists(f"{name!r} is an alias of collection {aliases[name]!r}")
            try:
                existing: CollectionMeta | None = self.store.resolve(name)
            except NotFound:
                existing = None
            if existing is None:
                count = len(self.store.list_collections())
                if count >= self.settings.max_collections:
                    raise ResourceExhausted(
                        f"collection {name!r}: this server holds {count} collections, the limit "
                        f"(SEARCH_MAX_COLLECTIONS) is {self.settings.max_collections}; delete unused ones")
                meta = CollectionMeta(name=name, dim=dim, model=model, dataset=dataset, exact_only=exact_only)
                self.store.create_collection(meta)
                return self._info(meta, aliases)
            if existing.dim != dim:
                raise FailedPrecondition(f"collection {name!r} exists with dim {existing.dim}, not {dim}")
            for field, have, want in (("model", existing.model, model), ("dataset", existing.dataset, dataset)):
                if want and have != want:
                    raise FailedPrecondition(f"collection {name!r} exists for {field} {have!r}, not {want!r}")
            if not exist_ok:
                raise AlreadyExists(f"collection {name!r} already exists (dim {dim}); set exist_ok to reuse it")
            return self._info(existing, aliases)

    def delete_collection(self, name: str) -> None:
        """Deletes a collection (by its own name, not an alias) and the aliases that point at it."""
        with self._admin:
            aliases = self.store.list_aliases()
            if name in aliases:
                raise FailedPrecondition(f"{name!r} is an alias of collection {aliases[name]!r}; delete the alias, "
                                         "or the collection by its own name")
            if not self.store.delete_collection(name):
                raise NotFound(f"no collection named {name!r}")

    def get_collection(self, name: str) -> CollectionInfo:
        """The collection ``name`` is, or the one alias ``name`` points at."""
        return self._info(self.store.resolve(name))

    def list_collections(self) -> list[CollectionInfo]:
        aliases = self.store.list_aliases()
        return [self._info(meta, aliases) for meta in sorted(self.store.list_collections(), key=lambda m: m.name)]

    def points_counts(self) -> dict[str, int]:
        """Collection -> points (for the metrics)."""
        return {meta.name: self.store.stats(meta.name).points_count for meta in self.store.list_collections()}

    def set_alias(self, alias: str, collection: str) -> None:
        """Points ``alias`` at ``collection``, atomically replacing its previous target (a model swap)."""
        check_name(alias, "alias")
        with self._admin:
            aliases = self.store.list_aliases()
            if collection in aliases:
                raise InvalidArgument(f"{collection!r} is an alias; an alias must point at a collection")
            self.store.set_alias(alias, collection)

    def delete_alias(self, alias: str) -> None:
        with self._admin:
            if not self.store.delete_alias(alias):
                raise NotFound(f"no alias named {alias!r}")

    def list_aliases(self) -> dict[str, str]:
        return self.store.list_aliases()

    # -- writes ----------------------------------------------------------------------------------

    def upsert_session(self) -> UpsertSession:
        """A session for one Upsert stream: feed it messages with ``add``, one acknowledgement each."""
        return UpsertSession(self)

    def upsert(self, collection: str, points: Sequence[Point]) -> int:
        """Upserts one batch (in-process callers), checked and durable as one stream message;
        returns the distinct points written."""
        return self.upsert_session().add(collection, points)

    def check_point(self, point: Point, meta: CollectionMeta, where: str) -> Point:
        """The point to store: id checked or derived from (dataset, path), vector and payload checked."""
        payload = point.payload
        for field, value in (("dataset", payload.dataset), ("path", payload.path)):
            if "\0" in value:
                raise InvalidArgument(f"{where}: payload.{field} contains a NUL character")
        derived = ""
        if payload.dataset or payload.path:
            if not (payload.dataset and payload.path):
                missing = "path" if payload.dataset else "dataset"
                raise InvalidArgument(f"{where}: payload has no {missing}; the id is derived from dataset and path")
            derived = point_id(payload.dataset, payload.path)
        if point.id:
            pid = check_point_id(point.id, where)
            if derived and pid != derived:
                raise InvalidArgument(f"{where}: id {pid} is not the id of ({payload.dataset!r}, {payload.path!r}), "
                                      f"which is {derived}; leave the id empty to have it derived")
        elif derived:
            pid = derived
        else:
            raise InvalidArgument(f"{where}: no id, and no payload dataset and path to derive it from")
        for i, label in enumerate(payload.labels):
            if not label:
                raise InvalidArgument(f"{where}: payload.labels[{i}] is empty")
        return Point(id=pid, vector=check_vector(point.vector, meta, where), payload=payload)

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Deletes points by id; returns how many of them existed."""
        if len(ids) > self.settings.max_delete_ids:
            raise ResourceExhausted(f"delete: {len(ids)} ids; at most {self.settings.max_delete_ids} per request")
        meta = self.store.resolve(collection)
        checked = [check_point_id(pid, f"ids[{i}]") for i, pid in enumerate(ids)]
        if not checked:
            return 0
        with self._timed("delete", write=True):
            existing = self.store.retrieve(meta.name, checked, with_vector=False)
            self.store.delete(meta.name, checked)
            if self.settings.sync_writes:
                self.store.sync(meta.name)
        return len(existing)

    # -- reads -----------------------------------------------------------------------------------

    def _check_parts(self, query: Query, meta: CollectionMeta, where: str) -> tuple[QueryPart, ...]:
        if query.point_id or len(query.vector):
            raise InvalidArgument(f"{where}: give a vector, a query_point_id or composed parts, not several")
        if len(query.parts) > MAX_QUERY_PARTS:
            raise InvalidArgument(f"{where}: {len(query.parts)} composed parts; at most {MAX_QUERY_PARTS}")
        parts = []
        for i, part in enumerate(query.parts):
            at = f"{where}: composed[{i}]"
            if not np.isfinite(part.weight):
                raise InvalidArgument(f"{at}: weight {part.weight} is not finite")
            if part.point_id and len(part.vector):
                raise InvalidArgument(f"{at}: give a vector or a point_id, not both")
            if part.point_id:
                parts.append(replace(part, point_id=check_point_id(part.point_id, f"{at}.point_id")))
            else:
                parts.append(replace(part, vector=check_vector(part.vector, meta, at)))
        if not any(p.weight for p in parts):
            raise InvalidArgument(f"{where}: every composed part has weight 0")
        return tuple(parts)

    def _check_query(self, query: Query, meta: CollectionMeta, where: str) -> Query:
        if not 1 <= query.limit <= self.settings.max_limit:
            raise InvalidArgument(f"{where}: limit {query.limit} is not between 1 and {self.settings.max_limit}")
        if query.parts:
            query = replace(query, parts=self._check_parts(query, meta, where))
        if query.point_id and len(query.vector):
            raise InvalidArgument(f"{where}: give a vector or query_point_id, not both")
        vector = query.vector if query.point_id or query.parts else check_vector(query.vector, meta, where)
        flt = check_filter(query.filter, f"{where}: filter")
        exclude = tuple(check_point_id(pid, f"{where}: exclude_ids[{i}]") for i, pid in enumerate(query.exclude_ids))
        point = check_point_id(query.point_id, f"{where}: query_point_id") if query.point_id else ""
        return replace(query, vector=vector, filter=flt, exclude_ids=exclude, point_id=point)

    def _with_stored_vectors(self, meta: CollectionMeta, queries: list[Query], wheres: list[str]) -> list[Query]:
        """Queries by stored point get that point's vector (one engine call) and exclude the point;
        composed queries get their composed vector and exclude the stored points among their parts."""
        wanted = sorted({q.point_id for q in queries if q.point_id}
                        | {p.point_id for q in queries for p in q.parts if p.point_id})
        if not wanted:
            return [self._composed(q, {}, w) if q.parts else q for q, w in zip(queries, wheres, strict=True)]
        found = self.store.stored_vectors(meta.name, wanted)
        out = []
        for query, where in zip(queries, wheres, strict=True):
            if query.parts:
                query = self._composed(query, found, where)
            elif query.point_id:
                if query.point_id not in found:
                    raise NotFound(f"{where}: no point {query.point_id} in collection {meta.name!r}")
                query = replace(query, vector=found[query.point_id],
                                exclude_ids=(query.point_id, *query.exclude_ids))
            out.append(query)
        return out

    @staticmethod
    def _composed(query: Query, found: dict[str, np.ndarray], where: str) -> Query:
        """The query with its composed vector (DESIGN §5), excluding the stored points it was built from."""
        vectors, stored = [], []
        for i, part in enumerate(query.parts):
            if part.point_id:
                if part.point_id not in found:
                    raise NotFound(f"{where}: composed[{i}]: no point {part.point_id}")
                vectors.append(found[part.point_id])
                stored.append(part.point_id)
            else:
                vectors.append(part.vector)
        vector = compose(vectors, [p.weight for p in query.parts])
        if not np.isfinite(vector).all():
            raise InvalidArgument(f"{where}: the weighted composed parts sum to zero; no direction to search")
        exclude = tuple(dict.fromkeys((*stored, *query.exclude_ids)))
        return replace(query, vector=vector, parts=(), exclude_ids=exclude)

    def _check_cost(self, queries: Sequence[Query], dims: Sequence[int], what: str) -> None:
        """Refuses, before any work, a request whose answer would be too big to build or send.

        The bound is on hits (the sum of the limits, ``max_batch_hits``) and on the answer's size
        estimated from them: ~48 bytes per hit, up to ``PAYLOAD_BYTES_ESTIMATE`` for its payload and
        4 bytes per vector value, against the server's ``max_message_bytes``.
        """
        hits = sum(q.limit for q in queries)
        if hits > self.settings.max_batch_hits:
            raise ResourceExhausted(
                f"{what}: {len(queries)} queries asking for {hits} hits in all; at most "
                f"{self.settings.max_batch_hits} (SEARCH_MAX_BATCH_HITS): lower the limits or split the batch")
        size = sum(q.limit * (48 + (PAYLOAD_BYTES_ESTIMATE if q.with_payload else 0)
                              + (4 * dim if q.with_vector else 0)) for q, dim in zip(queries, dims, strict=True))
        if size > self.settings.max_message_bytes:
            raise ResourceExhausted(
                f"{what}: the answer would be about {size} bytes, over the {self.settings.max_message_bytes}-byte "
                "message limit; ask for fewer hits, or without vectors or payloads")

    def search(self, collection: str, query: Query) -> list[Hit]:
        """The ``query.limit`` nearest points (cosine), best first, honouring filter and exclusions."""
        meta = self.store.resolve(collection)
        checked = self._check_query(query, meta, "search")
        self._check_cost([checked], [meta.dim], "search")
        with self._timed("search"):
            [ready] = self._with_stored_vectors(meta, [checked], ["search"])
            return self._query(meta.name, [ready])[0]

    def search_batch(self, queries: Sequence[tuple[str, Query]]) -> list[list[Hit]]:
        """Answers (collection, query) pairs in order; one engine call per collection.

        Every query is checked, and the whole batch's cost bounded, before any of it runs.
        """
        if len(queries) > self.settings.max_batch_queries:
            raise ResourceExhausted(f"search batch: {len(queries)} queries; at most "
                                    f"{self.settings.max_batch_queries} per request")
        groups: dict[str, tuple[CollectionMeta, list[int], list[Query], list[str]]] = {}
        dims: list[int] = []
        checked_all: list[Query] = []
        for i, (collection, query) in enumerate(queries):
            where = f"query {i} of {len(queries)}"
            try:
                meta = self.store.resolve(collection)
            except NotFound as exc:
                raise NotFound(f"{where}: {exc.message}") from None
            _, positions, checked, wheres = groups.setdefault(meta.name, (meta, [], [], []))
            positions.append(i)
            checked.append(self._check_query(query, meta, where))
            wheres.append(where)
            checked_all.append(checked[-1])
            dims.append(meta.dim)
        self._check_cost(checked_all, dims, "search batch")
        results: list[list[Hit]] = [[] for _ in queries]
        with self._timed("search_batch"):
            for name, (meta, positions, checked, wheres) in groups.items():
                ready = self._with_stored_vectors(meta, checked, wheres)
                for position, hits in zip(positions, self._query(name, ready), strict=True):
                    results[position] = hits
        return results

    def _query(self, name: str, queries: list[Query]) -> list[list[Hit]]:
        """Runs checked queries on the engine; few excluded ids are dropped from the answer rather
        than filtered in the engine (see ``POSTFILTER_MAX_EXCLUDED``): the same hits, faster."""
        engine = [replace(q, exclude_ids=(), limit=q.limit + len(q.exclude_ids))
                  if 0 < len(q.exclude_ids) <= POSTFILTER_MAX_EXCLUDED else q for q in queries]
        answers = self.store.query(name, engine)
        out = []
        for query, sent, hits in zip(queries, engine, answers, strict=True):
            if sent is not query:
                excluded = set(query.exclude_ids)
                hits = [h for h in hits if h.id not in excluded][: query.limit]
            out.append(hits)
        return out

    def search_by_id(self, collection: str, pid: str, limit: int, filter: Filter | None = None,
                     exclude_ids: Sequence[str] = (), exact: bool = False, with_payload: bool = True,
                     with_vector: bool = False) -> list[Hit]:
        """Searches with the stored vector of point ``pid``; ``pid`` itself is never among the hits."""
        query = Query(vector=np.empty(0, np.float32), limit=limit, filter=filter, exclude_ids=tuple(exclude_ids),
                      exact=exact, with_payload=with_payload, with_vector=with_vector,
                      point_id=check_point_id(pid, "search by id: id"))
        return self.search(collection, query)

    def count(self, collection: str, filter: Filter | None = None) -> int:
        """Exact number of points matching ``filter`` (all points when None)."""
        meta = self.store.resolve(collection)
        flt = check_filter(filter, "count: filter")
        with self._timed("count"):
            return self.store.count(meta.name, flt)

    def scroll(self, collection: str, filter: Filter | None = None, limit: int = 0, offset: str = "",
               with_vector: bool = False) -> tuple[list[Point], str]:
        """A page of points in id order starting at ``offset`` (empty: the first); limit 0 means 256.

        Returns:
            The points and the next page's offset ('' when there is no more).
        """
        meta = self.store.resolve(collection)
        limit = limit or DEFAULT_SCROLL_LIMIT
        if not 1 <= limit <= self.settings.max_limit:
            raise InvalidArgument(f"scroll: limit {limit} is not between 1 and {self.settings.max_limit}")
        flt = check_filter(filter, "scroll: filter")
        start = check_point_id(offset, "scroll: offset") if offset else None
        with self._timed("scroll"):
            points, next_offset = self.store.scroll(meta.name, flt, limit, start, with_vector)
        return points, next_offset or ""


class UpsertSession:
    """One Upsert stream: each message is checked whole, then written, then acknowledged.

    A message is the unit of atomicity and of acknowledgement: a bad point rejects its message
    before anything of it is written, while the messages before it stay written (and durable, each
    acknowledged after its fsync when ``sync_writes``). Re-sending is harmless: ids are deterministic.
    """

    def __init__(self, core: SearchCore) -> None:
        self.core = core
        self.meta: CollectionMeta | None = None
        self.messages = 0
        self._name = ""  # the collection (or alias) the stream named first

    def add(self, collection: str, points: Sequence[Point], size_bytes: int = 0) -> int:
        """Checks, writes and makes durable one message's points (``size_bytes``: its serialized size,
        when known); returns how many distinct points it wrote (a point sent twice counts once)."""
        settings = self.core.settings
        where = f"upsert message {self.messages}"
        self.messages += 1
        if size_bytes > settings.max_upsert_bytes:
            raise ResourceExhausted(f"{where}: {size_bytes} bytes; at most {settings.max_upsert_bytes} bytes per "
                                    "message (send the points in more, smaller messages)")
        if len(points) > settings.max_upsert_points:
            raise ResourceExhausted(f"{where}: {len(points)} points; at most {settings.max_upsert_points} per "
                                    "message (send the points in more, smaller messages)")
        if collection and self.meta is not None and collection != self._name:
            raise InvalidArgument(f"{where}: names collection {collection!r}, but the stream began with "
                                  f"{self._name!r}")
        if self.meta is None:
            if not collection:
                raise InvalidArgument(f"{where}: the first message must name the collection")
            self.meta = self.core.store.resolve(collection)
            self._name = collection
        meta = self.meta
        checked = [self.core.check_point(p, meta, f"{where}, point {i} of {len(points)}")
                   for i, p in enumerate(points)]
        # The last of several points with one id wins, as it would in the engine; it counts once.
        distinct = list({p.id: p for p in checked}.values())
        if not distinct:
            return 0
        with self.core._timed("upsert", write=True):
            self.core.store.upsert(meta.name, distinct)
        if settings.sync_writes:
            with self.core._timed("sync", write=True):
                self.core.store.sync(meta.name)
        if self.core.metrics is not None:
            self.core.metrics.upserted.labels(meta.name).inc(len(distinct))
        return len(distinct)
