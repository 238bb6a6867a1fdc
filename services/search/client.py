"""Client helpers for ``SearchService``: point messages and Upsert streams split within the size limits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from retrieval.v1 import search_pb2

from services.search.config import MIB

# Field tag and length prefix of one repeated Point inside an UpsertRequest, at most.
_POINT_OVERHEAD = 6


def point_message(vector: np.ndarray, dataset: str, path: str, labels: Sequence[str] = (),
                  point_id: str = "") -> search_pb2.Point:
    """A Point; with ``point_id`` empty the service derives the id from (dataset, path)."""
    return search_pb2.Point(id=point_id, vector=np.asarray(vector, dtype=np.float32).tolist(),
                            payload=search_pb2.Payload(dataset=dataset, path=path, labels=list(labels)))


def upsert_messages(collection: str, points: Iterable[search_pb2.Point], max_bytes: int = 4 * MIB,
                    max_points: int = 1024) -> Iterator[search_pb2.UpsertRequest]:
    """Splits ``points`` into UpsertRequest messages of at most ``max_bytes`` and ``max_points`` each.

    The first message names the collection. Keep both limits at or below the service's
    ``max_upsert_bytes`` / ``max_upsert_points`` (defaults 16 MiB / 4096).
    """
    batch: list[search_pb2.Point] = []
    size = len(collection) + 8
    first = True
    for point in points:
        point_size = point.ByteSize() + _POINT_OVERHEAD
        if batch and (size + point_size > max_bytes or len(batch) >= max_points):
            yield search_pb2.UpsertRequest(collection=collection if first else "", points=batch)
            first, batch, size = False, [], len(collection) + 8
        batch.append(point)
        size += point_size
    if batch or first:
        yield search_pb2.UpsertRequest(collection=collection if first else "", points=batch)
