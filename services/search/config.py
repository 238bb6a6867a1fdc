"""Search service settings (environment prefix ``SEARCH_``, or the flags of ``retrieval search serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServerSettings
from services.search.edge_store import EXACT_SCAN_MAX_BYTES, SCAN_COMPONENTS_PER_CALL

MIB = 1024 * 1024
EDGE_GRPC_WORKERS = 4
SERVER_GRPC_WORKERS = 64


class SearchSettings(ServerSettings):
    """Everything the search service is configured with. Sizes in bytes, times in seconds."""

    model_config = SettingsConfigDict(env_prefix="SEARCH_", extra="ignore", validate_default=True)

    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    metrics_port: int = Field(9102, ge=-1, le=65535,
                              description="Prometheus metrics port (0: pick a free one, -1: off)")
    grpc_workers: int = Field(
        0, ge=0, description="threads running unary RPCs (0: 4 for the edge backend, 64 for the server backend). "
                             "Edge queries are CPU work in this process, so threads beyond a few only queue on "
                             "the GIL and slow health checks; a Qdrant server's calls wait on the network")
    backend: Literal["edge", "server"] = Field(
        "edge", description="'edge': Qdrant Edge in-process on --data-dir; 'server': a Qdrant server at --url")
    data_dir: Path = Field(Path("data/search"), description="edge backend: directory of the collections")
    url: str | None = Field(None, description="server backend: Qdrant URL, e.g. http://qdrant:6333")
    api_key: str | None = Field(None, description="server backend: Qdrant API key")
    https: bool | None = Field(None, description="server backend: TLS to Qdrant (default: from the URL scheme)")
    prefer_grpc: bool = Field(True, description="server backend: talk gRPC to Qdrant instead of REST")
    grpc_port: int = Field(6334, ge=1, le=65535, description="server backend: Qdrant's gRPC port")
    qdrant_timeout: float = Field(10.0, gt=0, description="server backend: timeout of one Qdrant call, in s")
    health_interval: float = Field(
        5.0, gt=0, description="server backend: seconds between reachability checks (health NOT_SERVING on failure)")
    alias_cache_seconds: float = Field(
        1.0, ge=0, description="server backend: how long a resolved alias/collection is cached (other replicas' "
                               "alias swaps show after at most this long; 0: resolve on every call)")
    shard_number: int | None = Field(
        None, ge=1, description="server backend: shards of a new collection (None: the server's default, the number "
                                "of peers at creation, which a cluster cannot outgrow without resharding)")
    replication_factor: int | None = Field(
        None, ge=1, description="server backend: copies of each shard of a new collection (None: the server's "
                                "default, storage.collection.replication_factor)")
    write_consistency_factor: int | None = Field(
        None, ge=1, description="server backend: replicas that must acknowledge a write to a new collection "
                                "(None: the server's default; at most replication_factor)")
    hnsw_m: int = Field(16, ge=4, le=128, description="HNSW edges per node (new collections)")
    hnsw_ef_construct: int = Field(128, ge=4, description="HNSW candidates while building (new collections)")
    hnsw_ef: int = Field(128, ge=1, description="HNSW candidates while searching (raised to k when k is larger)")
    indexing_threshold_kb: int = Field(
        10_000, ge=1, description="segments larger than this (KiB of vectors) get an HNSW index; smaller ones "
                                  "are scanned exactly, which is faster at that size")
    index_idle_seconds: float = Field(
        2.0, ge=0, description="edge backend: build the HNSW index once a collection had no writes for this long")
    search_threads: int = Field(0, ge=0, description="edge backend: search threads per collection (0: per CPU)")
    exact_scan_max_bytes: int = Field(
        EXACT_SCAN_MAX_BYTES, ge=0,
        description="edge backend: largest in-memory copy of an exact-only collection's vectors (the evaluator's "
                    "run collections), which answers their unfiltered queries as BLAS matrix products on every core "
                    "and without the GIL instead of Edge's one-core scan; 0: off")
    scan_components_per_call: int = Field(
        SCAN_COMPONENTS_PER_CALL, gt=0,
        description="edge backend: vector components (points x dim per scanning query) one engine call may scan; "
                    "a larger SearchBatch is split, because the engine holds the GIL for a whole call and "
                    "health checks wait for it (lower: steadier latency; higher: a little more throughput)")
    sync_writes: bool = Field(
        True, description="fsync the write-ahead log before acknowledging an upsert (survives power loss, not "
                          "only a process crash); edge backend")
    max_upsert_points: int = Field(4096, gt=0, description="points in one UpsertRequest message")
    max_upsert_bytes: int = Field(16 * MIB, gt=0, description="serialized size of one UpsertRequest message")
    max_limit: int = Field(10_000, gt=0, description="largest k (limit) of a search or scroll page")
    max_batch_queries: int = Field(1024, gt=0, description="queries in one SearchBatch request")
    max_batch_hits: int = Field(
        65_536, gt=0, description="hits one Search or SearchBatch request may ask for (the sum of its limits)")
    max_collections: int = Field(
        256, gt=0, description="collections this server holds (each costs memory and threads even when empty)")
    max_delete_ids: int = Field(100_000, gt=0, description="ids in one Delete request")

    @model_validator(mode="after")
    def _workers_for_backend(self) -> SearchSettings:
        # Measured with benchmarks/load.py (64 clients, 2 cores): 8 threads instead of 64 on the edge
        # backend gave the search health check a p50 of 23-25 ms instead of 35-38 ms and 10-15% more
        # searches per second; 4 instead of 8, a p50 of 13 ms instead of 30 and a p99 of 49 ms instead
        # of 74-80, with 8-10% more searches (2: p99 29 ms, but an evaluator's two batches in flight
        # on the exact scan would take both threads from everyone else).
        if self.grpc_workers == 0:
            self.grpc_workers = EDGE_GRPC_WORKERS if self.backend == "edge" else SERVER_GRPC_WORKERS
        return self

    @model_validator(mode="after")
    def _server_needs_url(self) -> SearchSettings:
        if self.backend == "server" and not self.url:
            raise ValueError("backend 'server' needs a url (--url / SEARCH_URL), e.g. http://qdrant:6333")
        return self

    @model_validator(mode="after")
    def _writes_can_be_acknowledged(self) -> SearchSettings:
        if (self.write_consistency_factor is not None and self.replication_factor is not None
                and self.write_consistency_factor > self.replication_factor):
            raise ValueError(f"write_consistency_factor {self.write_consistency_factor} exceeds replication_factor "
                             f"{self.replication_factor}: no write could ever be acknowledged")
        return self
