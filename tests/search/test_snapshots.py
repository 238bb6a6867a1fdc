"""Snapshot and recovery of collections made by the server backend (services/search/snapshots.py).

What runs here: qdrant-client's local mode has no snapshots, so (1) the helper's refusal there is checked,
(2) the whole sequence (layouts and aliases read through the server backend on local mode, one snapshot
per peer and collection, pruning, recovery on every peer with the snapshot as the source of truth, aliases
restored) runs against recording peer clients, and (3) with ``QDRANT_URL`` set, a real server snapshots a
collection, takes more writes, and is recovered to the snapshot's content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from services.common.errors import FailedPrecondition
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.qdrant_store import ClusterParams, QdrantStore
from services.search.snapshots import PeerSnapshot, create_snapshots, peer_urls, recover, restore_aliases
from services.search.store import CollectionMeta, Payload, Point
from tests.search.conftest import QDRANT_URL


@dataclass
class FakePeer:
    """The snapshot calls of one Qdrant peer, recorded; snapshots named as Qdrant names them."""

    url: str
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    stored: dict[str, list[models.SnapshotDescription]] = field(default_factory=dict)

    def create_snapshot(self, collection_name: str, wait: bool = True) -> models.SnapshotDescription:
        self.calls.append(("create", collection_name, wait))
        listed = self.stored.setdefault(collection_name, [])
        desc = models.SnapshotDescription(name=f"{collection_name}-{len(listed)}.snapshot",
                                          creation_time=f"2026-01-01T00:00:{len(listed):02d}", size=100, checksum="c")
        listed.append(desc)
        return desc

    def list_snapshots(self, collection_name: str) -> list[models.SnapshotDescription]:
        return list(self.stored.get(collection_name, []))

    def delete_snapshot(self, collection_name: str, snapshot_name: str, wait: bool = True) -> bool:
        self.calls.append(("delete", collection_name, snapshot_name))
        self.stored[collection_name] = [d for d in self.stored[collection_name] if d.name != snapshot_name]
        return True

    def recover_snapshot(self, collection_name: str, location: str, **kwargs: Any) -> bool:
        self.calls.append(("recover", collection_name, location, kwargs["priority"], kwargs["checksum"]))
        return True


PEERS = ["http://qdrant-0.qdrant-headless:6333", "http://qdrant-1.qdrant-headless:6333"]


@pytest.fixture
def cluster() -> tuple[QdrantStore, dict[str, FakePeer]]:
    """Two collections and an alias made through the server backend (on local mode), and two fake peers."""
    store = QdrantStore(QdrantClient(location=":memory:"), serialize=True, local=True,
                        cluster=ClusterParams(shard_number=6, replication_factor=2))
    store.create_collection(CollectionMeta(name="products-v1", dim=4, model="clip", dataset="shop"))
    store.create_collection(CollectionMeta(name="scratch", dim=3, model="m", dataset="ds"))
    store.set_alias("products", "products-v1")
    return store, {url: FakePeer(url) for url in PEERS}


def test_local_mode_has_no_snapshots() -> None:
    client = QdrantClient(location=":memory:")
    with pytest.raises(FailedPrecondition, match="local mode has no snapshots"):
        create_snapshots(client, "http://unused", lambda _url: client)
    client.create_collection("c", vectors_config=models.VectorParams(size=2, distance=models.Distance.COSINE))
    with pytest.raises(FailedPrecondition, match="local mode has no snapshots"):
        create_snapshots(client, "http://unused", lambda _url: client, peers=["local"])


def test_every_peer_snapshots_every_collection_and_old_snapshots_go(
        cluster: tuple[QdrantStore, dict[str, FakePeer]]) -> None:
    store, peers = cluster
    for _ in range(3):
        manifest = create_snapshots(store.client, "http://qdrant:6333", peers.__getitem__, keep=2, peers=PEERS)
    assert manifest.peers == PEERS
    assert {(s.peer, s.collection) for s in manifest.snapshots} == {(p, c) for p in PEERS for c in ("products-v1",
                                                                                                      "scratch")}
    # The third run deleted each peer's oldest snapshot of each collection and kept the newest two.
    assert {(d.peer, d.name) for d in manifest.deleted} == {(p, f"{c}-0.snapshot") for p in PEERS
                                                             for c in ("products-v1", "scratch")}
    assert [d.name for d in peers[PEERS[0]].stored["scratch"]] == ["scratch-1.snapshot", "scratch-2.snapshot"]
    # What snapshots do not carry: the aliases, and the layout (as the server reports it; None in local mode).
    assert manifest.aliases == {"products": "products-v1"}
    assert manifest.collections["products-v1"]["metadata"] == {"model": "clip", "dataset": "shop", "exact_only": False}
    assert manifest.collections["products-v1"]["dim"] == 4
    assert '"products-v1-2.snapshot"' in manifest.to_json()


def test_only_the_named_collections_are_snapshotted(cluster: tuple[QdrantStore, dict[str, FakePeer]]) -> None:
    store, peers = cluster
    manifest = create_snapshots(store.client, "http://qdrant:6333", peers.__getitem__, ["scratch"], peers=PEERS)
    assert {s.collection for s in manifest.snapshots} == {"scratch"} and manifest.aliases == {}
    assert manifest.deleted == []  # keep=0 deletes nothing


def test_recovery_runs_on_every_peer_with_the_snapshot_as_source_of_truth(
        cluster: tuple[QdrantStore, dict[str, FakePeer]]) -> None:
    store, peers = cluster
    locations = {url: f"https://bucket.example/{i}.snapshot" for i, url in enumerate(PEERS)}
    recover(peers.__getitem__, "products-v1", locations, checksums={PEERS[1]: "abc"})
    assert [peers[url].calls for url in PEERS] == [
        [("recover", "products-v1", locations[PEERS[0]], models.SnapshotPriority.SNAPSHOT, None)],
        [("recover", "products-v1", locations[PEERS[1]], models.SnapshotPriority.SNAPSHOT, "abc")]]
    store.delete_alias("products")
    restore_aliases(store, {"products": "products-v1"})
    assert store.resolve("products").model == "clip"


def _cluster_client(status: object) -> Any:
    """A stand-in with the one REST call peer_urls makes: GET /cluster."""
    response = SimpleNamespace(result=status)
    return SimpleNamespace(http=SimpleNamespace(distributed_api=SimpleNamespace(cluster_status=lambda: response)))


def test_peers_are_found_from_the_cluster_status() -> None:
    status = models.ClusterStatusOneOf1.model_construct(
        status="enabled", peer_id=1,
        peers={"2": models.PeerInfo(uri="http://qdrant-1.qdrant-headless:6335/"),
               "1": models.PeerInfo(uri="http://qdrant-0.qdrant-headless:6335/")})
    # The peers' p2p URIs, at the REST port of the URL the search service uses.
    assert peer_urls(_cluster_client(status), "http://qdrant.retrieval.svc.cluster.local:6333") == [
        "http://qdrant-0.qdrant-headless:6333", "http://qdrant-1.qdrant-headless:6333"]
    single = _cluster_client(models.ClusterStatusOneOf(status="disabled"))
    assert peer_urls(single, "http://qdrant:6333") == ["http://qdrant:6333"]


def test_a_snapshot_record_names_its_peer() -> None:
    assert PeerSnapshot("http://p:6333", "c", "c-1.snapshot", 10, None).peer == "http://p:6333"


@pytest.mark.skipif(not QDRANT_URL, reason="QDRANT_URL is not set: snapshot and recovery were NOT run on a real "
                                           "Qdrant server")
def test_a_real_server_snapshots_and_recovers_a_collection(prefix: str) -> None:
    settings = SearchSettings(backend="server", url=QDRANT_URL, prefer_grpc=False, shard_number=2,
                              replication_factor=1, alias_cache_seconds=0)
    store = QdrantStore.from_settings(settings)
    core = SearchCore(settings, store)
    name = f"{prefix}__snap"

    def connect(url: str) -> QdrantClient:
        return QdrantClient(url=url, api_key=settings.api_key, prefer_grpc=False, check_compatibility=False)

    rng = np.random.default_rng(0)
    try:
        core.create_collection(name, 4, model="m", dataset="ds")
        first, late = rng.random((8, 4)).astype(np.float32), rng.random((5, 4)).astype(np.float32)
        core.upsert(name, [Point("", v, Payload("ds", f"{i}.jpg", ("a",))) for i, v in enumerate(first)])
        manifest = create_snapshots(store.client, QDRANT_URL, connect, [name])
        core.upsert(name, [Point("", v, Payload("ds", f"late{i}.jpg", ("b",))) for i, v in enumerate(late)])
        assert store.count(name, None) == 13
        # Each peer recovers from its own snapshot, downloaded from the peer's snapshot URL.
        locations = {s.peer: f"{s.peer}/collections/{name}/snapshots/{s.name}" for s in manifest.snapshots}
        recover(connect, name, locations, api_key=settings.api_key)
        assert store.count(name, None) == 8
        assert store.resolve(name).model == "m"
        params = store.client.get_collection(name).config.params
        assert (params.shard_number, params.replication_factor) == (2, 1)
    finally:
        store.delete_collection(name)
        core.close()
