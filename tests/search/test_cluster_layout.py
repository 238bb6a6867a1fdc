"""New collections get the shard number, replication and write consistency of the search settings.

qdrant-client's local mode accepts these arguments and ignores them (it reports ``None`` for each), so the
local tests check the exact arguments the server backend passes to qdrant-client, through a recording
client; with ``QDRANT_URL`` set, a real server reports the layout it created.
"""

from __future__ import annotations

from typing import Any

import pytest
from qdrant_client import QdrantClient

from services.search.config import SearchSettings
from services.search.qdrant_store import ClusterParams, QdrantStore
from services.search.store import CollectionMeta
from tests.search.conftest import QDRANT_URL

LAYOUT = ("shard_number", "replication_factor", "write_consistency_factor")


class RecordingClient(QdrantClient):
    """Local mode that remembers the keyword arguments of every create_collection call."""

    def __init__(self) -> None:
        super().__init__(location=":memory:")
        self.created: list[dict[str, Any]] = []

    def create_collection(self, collection_name: str, **kwargs: Any) -> bool:  # type: ignore[override]
        self.created.append({"collection_name": collection_name, **kwargs})
        return super().create_collection(collection_name, **kwargs)


def _store(settings: SearchSettings) -> tuple[QdrantStore, RecordingClient]:
    client = RecordingClient()
    return QdrantStore(client, serialize=True, local=True, cluster=ClusterParams.from_settings(settings)), client


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEARCH_SHARD_NUMBER", "6")
    monkeypatch.setenv("SEARCH_REPLICATION_FACTOR", "2")
    monkeypatch.setenv("SEARCH_WRITE_CONSISTENCY_FACTOR", "1")
    settings = SearchSettings(backend="server", url="http://qdrant:6333")
    assert ClusterParams.from_settings(settings) == ClusterParams(6, 2, 1)
    # from_settings builds the server backend's store with them (no connection is made yet).
    assert QdrantStore.from_settings(settings).cluster == ClusterParams(6, 2, 1)


def test_a_write_quorum_larger_than_the_replicas_is_refused() -> None:
    with pytest.raises(ValueError, match="write_consistency_factor 3 exceeds replication_factor 2"):
        SearchSettings(replication_factor=2, write_consistency_factor=3)
    with pytest.raises(ValueError):
        SearchSettings(shard_number=0)


def test_the_server_backend_passes_the_configured_layout_to_qdrant() -> None:
    settings = SearchSettings(backend="server", url="http://qdrant:6333", shard_number=6, replication_factor=2,
                              write_consistency_factor=1)
    store, client = _store(settings)
    store.create_collection(CollectionMeta(name="products", dim=4, model="m", dataset="ds"))
    assert [{k: call[k] for k in ("collection_name", *LAYOUT)} for call in client.created] == [
        {"collection_name": "products", "shard_number": 6, "replication_factor": 2, "write_consistency_factor": 1}]
    # Local mode ignores the layout (one process, no peers): what it reports is not evidence either way.
    params = client.get_collection("products").config.params
    assert (params.shard_number, params.replication_factor, params.write_consistency_factor) == (None, None, None)
    assert store.resolve("products").dim == 4


def test_without_settings_the_server_default_applies() -> None:
    store, client = _store(SearchSettings())
    store.create_collection(CollectionMeta(name="c", dim=3, model="m", dataset="ds"))
    assert {k: client.created[0][k] for k in LAYOUT} == dict.fromkeys(LAYOUT)


@pytest.mark.skipif(not QDRANT_URL, reason="QDRANT_URL is not set: the layout was NOT checked on a real Qdrant server")
def test_a_real_server_creates_the_configured_layout(prefix: str) -> None:
    # One peer suffices: a single node holds any number of shards, each with one replica.
    settings = SearchSettings(backend="server", url=QDRANT_URL, shard_number=3, replication_factor=1,
                              write_consistency_factor=1, alias_cache_seconds=0)
    store = QdrantStore.from_settings(settings)
    name = f"{prefix}__layout"
    try:
        store.create_collection(CollectionMeta(name=name, dim=4, model="m", dataset="ds"))
        params = store.client.get_collection(name).config.params
        assert (params.shard_number, params.replication_factor, params.write_consistency_factor) == (3, 1, 1)
    finally:
        store.delete_collection(name)
        store.close()
