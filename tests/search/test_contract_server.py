"""The contract suite on a real Qdrant server: runs when QDRANT_URL is set, and says so when it is not.

With ``QDRANT_URL`` (e.g. ``http://localhost:6333``) set, every test of ``test_core.py`` also runs on
the ``qdrant-server`` backend (see ``BACKENDS`` in conftest.py), and the checks below run against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.qdrant_store import QdrantStore
from services.search.store import IndexStatus, Payload, Point, Query, point_id
from tests.search.conftest import QDRANT_URL

pytestmark = pytest.mark.skipif(
    not QDRANT_URL, reason="QDRANT_URL is not set: the contract suite did NOT run against a real Qdrant server "
                           "(set QDRANT_URL=http://host:6333 to run it; tests/search/test_core.py then also "
                           "runs on the 'qdrant-server' backend)")


@pytest.mark.parametrize("prefer_grpc", [True, False], ids=["grpc", "rest"])
def test_server_round_trip(prefix: str, prefer_grpc: bool) -> None:
    settings = SearchSettings(backend="server", url=QDRANT_URL, prefer_grpc=prefer_grpc, alias_cache_seconds=0)
    store = QdrantStore.from_settings(settings)
    store.ping()
    core = SearchCore(settings, store)
    name = f"{prefix}__m"
    try:
        core.create_collection(name, 4, model="m", dataset="ds")
        vectors = np.eye(4, dtype=np.float32) + 0.1
        core.upsert(name, [Point("", v, Payload("ds", f"{i}.jpg", ("a",))) for i, v in enumerate(vectors)])
        store.optimize(name)
        info = core.get_collection(name)
        assert (info.meta.model, info.meta.dataset, info.points_count, info.status) == ("m", "ds", 4, IndexStatus.GREEN)
        hits = core.search(name, Query(vectors[2], 2))
        assert hits[0].id == point_id("ds", "2.jpg")
        core.set_alias(f"{prefix}__live", name)
        assert core.search_by_id(f"{prefix}__live", hits[0].id, 3)[0].id != hits[0].id
    finally:
        store.delete_collection(name)
        core.close()
