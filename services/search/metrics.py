"""Domain metrics of the search service (prefix ``search_``); labels are bounded: collection, operation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# From sub-millisecond HNSW queries to exact scans of large collections.
QUERY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BUILD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

READ_OPERATIONS = ("search", "search_batch", "search_by_id", "count", "scroll", "retrieve")
WRITE_OPERATIONS = ("upsert", "delete", "sync")


class _PointsCollector(Collector):
    """``search_points_total{collection}``: points per collection, read from the store at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("search_points_total", "Points stored, per collection.", labels=["collection"])
        try:
            for name, count in sorted(self._counts().items()):
                family.add_metric([name], float(count))
        except Exception as exc:  # a scrape must not fail because the store is down
            log.warning("points count for metrics failed: %s", exc)
        yield family


class SearchMetrics:
    """The search service's own series, registered on the server's registry.

    Attributes:
        query_seconds: engine time of one read operation (``search`` is one query, ``search_batch``
            one batch), in seconds, by operation.
        write_seconds: engine time of one write (``upsert``: one message's points), in seconds.
        upserted: points written (acknowledged by the engine's write-ahead log), by collection.
        index_build_seconds: duration of one HNSW index build (edge backend).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.query_seconds = Histogram("search_query_duration_seconds", "Engine seconds per read operation.",
                                       ["operation"], buckets=QUERY_BUCKETS, registry=registry)
        self.write_seconds = Histogram("search_write_duration_seconds", "Engine seconds per write operation.",
                                       ["operation"], buckets=QUERY_BUCKETS, registry=registry)
        self.upserted = Counter("search_upserted_points_total", "Points upserted (acknowledged), per collection.",
                                ["collection"], registry=registry)
        self.index_build_seconds = Histogram("search_index_build_seconds", "Seconds per HNSW index build.",
                                             buckets=BUILD_BUCKETS, registry=registry)
        for op in READ_OPERATIONS:
            self.query_seconds.labels(op)
        for op in WRITE_OPERATIONS:
            self.write_seconds.labels(op)

    def watch_points(self, counts: Callable[[], dict[str, int]]) -> None:
        """Reports ``counts()`` (collection -> points) as ``search_points_total`` on every scrape."""
        self.registry.register(_PointsCollector(counts))
