"""Search fixtures: a core on each backend, clustered test vectors, a server on port 0."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.edge_store import EdgeStore
from services.search.qdrant_store import QdrantStore
from services.search.store import IndexParams, Payload, Point, VectorStore

QDRANT_URL = os.environ.get("QDRANT_URL", "")
# The contract suite runs on a real Qdrant server only when QDRANT_URL is set (test_contract_server.py
# says so when it is not).
BACKENDS = ["edge", "qdrant-local", *(["qdrant-server"] if QDRANT_URL else [])]


def clustered(n: int, dim: int, classes: int = 5, seed: int = 0, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``classes`` random centres, and their class index (seeded)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def make_points(vectors: np.ndarray, labels: np.ndarray, dataset: str = "ds") -> list[Point]:
    """Points with derived ids: path ``c<label>/img<i>.jpg``, label ``c<label>`` (every 7th also 'x')."""
    return [Point(id="", vector=v, payload=Payload(dataset, f"c{c}/img{i}.jpg",
                                                   (f"c{c}", "x") if i % 7 == 0 else (f"c{c}",)))
            for i, (v, c) in enumerate(zip(vectors, labels, strict=True))]


def make_store(kind: str, tmp_path: Path, params: IndexParams | None = None) -> VectorStore:
    if kind == "edge":
        return EdgeStore(tmp_path / "edge", params, index_idle_seconds=None)
    if kind == "qdrant-local":
        return QdrantStore.local_mode(params=params)
    settings = SearchSettings(backend="server", url=QDRANT_URL, alias_cache_seconds=0)
    return QdrantStore.from_settings(settings)


@pytest.fixture
def prefix() -> str:
    """A name prefix unique to the test (a real server may hold other collections)."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=BACKENDS)
def core(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> Iterator[SearchCore]:
    """A core on each backend; what the test created is deleted afterwards."""
    store = make_store(request.param, tmp_path)
    core = SearchCore(SearchSettings(max_upsert_points=64, max_limit=500, max_batch_queries=8), store)
    yield core
    for alias in [a for a in store.list_aliases() if a.startswith(prefix)]:
        store.delete_alias(alias)
    for meta in store.list_collections():
        if meta.name.startswith(prefix):
            store.delete_collection(meta.name)
    core.close()
