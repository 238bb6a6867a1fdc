"""The ``VectorStore`` seam: plain data types, the protocol both backends implement, point-id derivation.

Vectors are float32 numpy arrays; the distance is cosine, so a score is the cosine similarity in
[-1, 1] (the engines normalise stored vectors and queries). A store takes *collection* names: the
core resolves aliases first (``resolve``), so one request sees one collection from start to end.
Stores raise ``services.common.errors.ServiceError`` subclasses; the core validates input before it
reaches a store, so an engine error is a fault (``Internal``) or an outage (``Unavailable``).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from services.common.errors import InvalidArgument

# Re-exported: ids and collection names are part of the search API (defined in common for clients).
from services.common.ids import POINT_ID_NAMESPACE as POINT_ID_NAMESPACE
from services.common.ids import collection_name as collection_name
from services.common.ids import point_id as point_id


class IndexStatus(enum.Enum):
    """Whether the collection's index is up to date (mirrors ``retrieval.v1.IndexStatus``)."""

    GREEN = "green"  # index up to date
    YELLOW = "yellow"  # optimisation (HNSW build) pending or running; queries are answered
    RED = "red"  # the engine reports a failure


@dataclass(frozen=True)
class Payload:
    """What is stored with each vector: dataset, image path relative to the dataset root, labels."""

    dataset: str = ""
    path: str = ""
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"dataset": self.dataset, "path": self.path, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, object] | None) -> Payload:
        data = data or {}
        labels = data.get("labels") or []
        return cls(dataset=str(data.get("dataset") or ""), path=str(data.get("path") or ""),
                   labels=tuple(str(x) for x in labels) if isinstance(labels, list) else (str(labels),))


@dataclass(frozen=True)
class Point:
    """A stored point: UUID string id, float32 vector of the collection's dim, payload."""

    id: str
    vector: np.ndarray
    payload: Payload = field(default_factory=Payload)


@dataclass(frozen=True)
class Filter:
    """Conditions on the payload; all given conditions must hold (an empty filter matches all).

    Attributes:
        labels_any: the point has at least one of these labels.
        dataset: the point's dataset is exactly this (when not empty).
        path_prefix: the point's path starts with this, byte-wise and case-sensitive (when not empty).
    """

    labels_any: tuple[str, ...] = ()
    dataset: str = ""
    path_prefix: str = ""

    @property
    def empty(self) -> bool:
        return not (self.labels_any or self.dataset or self.path_prefix)


@dataclass(frozen=True)
class QueryPart:
    """One part of a composed query: a vector, or (``vector`` empty) a stored point's own vector."""

    vector: np.ndarray
    weight: float
    point_id: str = ""


@dataclass(frozen=True)
class Query:
    """One k-NN query.

    Attributes:
        vector: float32 query vector of the collection's dim (any non-zero norm).
        limit: number of hits (k).
        filter: payload conditions, or None.
        exclude_ids: ids that must not be among the hits.
        exact: brute force over every point instead of the HNSW index (for evaluation).
        with_payload / with_vector: return the payload / stored (normalised) vector of each hit.
        point_id: when set (and ``vector`` empty), the core queries with this stored point's own
            vector and excludes the point; stores always receive a vector.
        parts: when set (``vector`` and ``point_id`` empty), a composed query: the core queries with
            ``services.common.vectors.compose`` of the parts and excludes the stored points among them.
    """

    vector: np.ndarray
    limit: int
    filter: Filter | None = None
    exclude_ids: tuple[str, ...] = ()
    exact: bool = False
    with_payload: bool = True
    with_vector: bool = False
    point_id: str = ""
    parts: tuple[QueryPart, ...] = ()


class Hit(NamedTuple):
    """A search result: id, cosine similarity, and payload/vector when asked for.

    A named tuple rather than a frozen dataclass: an evaluation batch builds ~10^6 of them, and a
    tuple is built in a fifth of the time.
    """

    id: str
    score: float
    payload: Payload | None = None
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class CollectionMeta:
    """What a collection is: its name, vector dim, the encoder model and dataset of its vectors, and
    whether it is only searched exactly (no HNSW index is ever built for it)."""

    name: str
    dim: int
    model: str = ""
    dataset: str = ""
    exact_only: bool = False


@dataclass(frozen=True)
class CollectionStats:
    """How a collection is doing: points stored and index status."""

    points_count: int
    status: IndexStatus


class VectorStore(Protocol):
    """What the search core needs of a vector engine; ``EdgeStore`` and ``QdrantStore`` implement it."""

    backend: str
    """'edge' or 'server' (qdrant-client, local mode included)."""

    def create_collection(self, meta: CollectionMeta) -> None:
        """Creates an empty collection (cosine distance, payload indexes); AlreadyExists if the name is taken."""
        ...

    def delete_collection(self, name: str) -> bool:
        """Deletes the collection and the aliases that point at it; False if it did not exist."""
        ...

    def list_collections(self) -> list[CollectionMeta]: ...

    def resolve(self, name: str) -> CollectionMeta:
        """The collection ``name`` is, or the one alias ``name`` points at; NotFound otherwise."""
        ...

    def stats(self, name: str) -> CollectionStats: ...

    def set_alias(self, alias: str, collection: str) -> None:
        """Points ``alias`` at ``collection``, atomically replacing its previous target."""
        ...

    def delete_alias(self, alias: str) -> bool: ...

    def list_aliases(self) -> dict[str, str]:
        """Alias -> collection."""
        ...

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        """Inserts or overwrites points; when it returns they are in the engine's write-ahead log."""
        ...

    def sync(self, collection: str) -> None:
        """Makes acknowledged writes survive power loss (fsync); a no-op where the engine does it itself."""
        ...

    def delete(self, collection: str, ids: Sequence[str]) -> None: ...

    def retrieve(self, collection: str, ids: Sequence[str], with_vector: bool) -> list[Point]:
        """The points with these ids that exist (missing ids are left out), with payloads."""
        ...

    def stored_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored (normalised) vectors of the ids that exist, by id (for queries by stored point)."""
        ...

    def query(self, collection: str, queries: Sequence[Query]) -> list[list[Hit]]:
        """Answers the queries (one engine call where the engine batches), best hit first."""
        ...

    def count(self, collection: str, filter: Filter | None) -> int:
        """Exact number of points matching ``filter``."""
        ...

    def scroll(self, collection: str, filter: Filter | None, limit: int, offset: str | None,
               with_vector: bool) -> tuple[list[Point], str | None]:
        """A page of points in id order from ``offset`` (inclusive), and the next page's first id."""
        ...

    def optimize(self, collection: str) -> None:
        """Builds pending indexes now and waits for them (tests, benchmarks, after bulk loads)."""
        ...

    def ping(self) -> None:
        """Raises Unavailable when the engine cannot be reached."""
        ...

    def close(self) -> None: ...


def check_point_id(value: str, where: str) -> str:
    """``value`` as a canonical UUID string; InvalidArgument naming ``where`` otherwise."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument(f"{where}: {value!r} is not a point id (a UUID string)") from None


@dataclass(frozen=True)
class IndexParams:
    """HNSW parameters of new collections, and the search-time candidate count.

    Attributes:
        m: edges per node of the HNSW graph.
        ef_construct: candidates considered while building the graph.
        ef: candidates considered while searching (raised to k when k is larger).
        indexing_threshold_kb: a segment gets an HNSW index once its vectors exceed this many KiB;
            smaller segments are scanned exactly (faster at that size). Qdrant's default: 10000.
    """

    m: int = 16
    ef_construct: int = 128
    ef: int = 128
    indexing_threshold_kb: int = 10_000

    def search_ef(self, limit: int) -> int:
        return max(self.ef, limit)
