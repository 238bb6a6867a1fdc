"""Qdrant snapshots of the search service's collections, one per peer, and their recovery.

The backup CronJob (deploy/k8s/components/backup) runs ``python -m services.search.snapshots create``:
for every peer of the cluster behind ``SEARCH_URL`` and every collection, Qdrant writes a collection
snapshot to its snapshot storage (an S3 bucket in production), and older ones beyond ``--keep`` are
deleted. A Qdrant collection snapshot holds only the shards on the peer that made it, so a backup is one
snapshot per peer; the printed manifest (JSON) names them, with each collection's layout and the aliases,
which snapshots do not carry. ``recover`` puts snapshots back, peer by peer (deploy/README.md, "Backup
and restore").

qdrant-client's local mode has no snapshots: these functions raise ``FailedPrecondition`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError
from qdrant_client import QdrantClient, models

from services.common.errors import FailedPrecondition, InvalidArgument, ServiceError
from services.search.config import SearchSettings
from services.search.qdrant_store import QdrantStore, translate

Connect = Callable[[str], QdrantClient]
_T = TypeVar("_T")


@dataclass(frozen=True)
class PeerSnapshot:
    """One collection snapshot that one peer wrote.

    Attributes:
        peer: the peer's REST URL.
        collection: the collection.
        name: the snapshot's name in that peer's snapshot storage.
        size: bytes.
        checksum: SHA-256, as Qdrant reports it (None when it reports none).
    """

    peer: str
    collection: str
    name: str
    size: int
    checksum: str | None


@dataclass
class Manifest:
    """What one backup run wrote: enough to restore the collections and their aliases."""

    created: str
    peers: list[str]
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    snapshots: list[PeerSnapshot] = field(default_factory=list)
    deleted: list[PeerSnapshot] = field(default_factory=list)

    def to_json(self) -> str:
        """The manifest as one JSON document."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _no_snapshots_in_local_mode(exc: Exception, what: str) -> ServiceError:
    if isinstance(exc, NotImplementedError):
        return FailedPrecondition(f"{what}: qdrant-client's local mode has no snapshots (a Qdrant server does)")
    return translate(exc, what)


def _call(what: str, fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except Exception as exc:
        raise _no_snapshots_in_local_mode(exc, what) from exc


def peer_urls(client: QdrantClient, url: str) -> list[str]:
    """REST URLs of every peer of the cluster ``client`` talks to (``[url]`` when clustering is off).

    Peers announce their peer-to-peer URI (``http://qdrant-1.qdrant-headless:6335``); their REST API is on
    the same host at the port of ``url``.
    """
    status = _call("cluster status", lambda: client.http.distributed_api.cluster_status().result)
    if not isinstance(status, models.ClusterStatusOneOf1):  # clustering disabled: one peer
        return [url]
    base = urlsplit(url)
    port = base.port or (443 if base.scheme == "https" else 6333)
    found = []
    for peer in status.peers.values():
        host = urlsplit(peer.uri).hostname
        if host is None:
            raise InvalidArgument(f"peer URI {peer.uri!r} has no host")
        found.append(urlunsplit((base.scheme, f"{host}:{port}", "", "", "")))
    return sorted(found)


def _layout(client: QdrantClient, name: str) -> dict[str, Any]:
    info = _call(f"collection {name!r}", lambda: client.get_collection(name))
    params = info.config.params
    vectors = params.vectors
    return {"dim": vectors.size if isinstance(vectors, models.VectorParams) else None,
            "shard_number": params.shard_number, "replication_factor": params.replication_factor,
            "write_consistency_factor": params.write_consistency_factor,
            "metadata": dict(info.config.metadata or {})}


def create_snapshots(client: QdrantClient, url: str, connect: Connect, collections: Sequence[str] = (),
                     keep: int = 0, peers: Sequence[str] | None = None) -> Manifest:
    """Has every peer snapshot every collection (or those named), and deletes all but the newest ``keep``.

    Args:
        client: a client of the cluster (any peer), for the collection list, layouts and aliases.
        url: the URL ``client`` talks to (its scheme and port reach every peer's REST API).
        connect: a REST client for one peer's URL.
        collections: the collections to snapshot; all of them when empty.
        keep: snapshots kept per peer and collection, newest first, this run's included (0: delete none).
        peers: the peers' REST URLs; found from the cluster status when None.

    Returns:
        The manifest of this run.
    """
    store = QdrantStore(client, alias_cache_seconds=0.0)
    names = list(collections) or [meta.name for meta in store.list_collections()]
    found_peers = list(peers) if peers is not None else peer_urls(client, url)
    manifest = Manifest(created=datetime.now(UTC).isoformat(timespec="seconds"), peers=found_peers,
                        collections={name: _layout(client, name) for name in names},
                        aliases={a: c for a, c in store.list_aliases().items() if c in names})
    for peer in found_peers:
        peer_client = connect(peer)
        for name in names:
            desc = _call(f"snapshot {name!r} on {peer}", partial(peer_client.create_snapshot, name, wait=True))
            if desc is None:
                raise FailedPrecondition(f"snapshot {name!r} on {peer}: Qdrant returned no snapshot description")
            manifest.snapshots.append(PeerSnapshot(peer, name, desc.name, int(desc.size), desc.checksum))
            if keep > 0:
                manifest.deleted += _prune(peer_client, peer, name, keep)
    return manifest


def _prune(client: QdrantClient, peer: str, collection: str, keep: int) -> list[PeerSnapshot]:
    listed = _call(f"list snapshots of {collection!r} on {peer}", lambda: client.list_snapshots(collection))
    newest_first = sorted(listed, key=lambda d: (d.creation_time or "", d.name), reverse=True)
    deleted = []
    for desc in newest_first[keep:]:
        _call(f"delete snapshot {desc.name!r} on {peer}",
              partial(client.delete_snapshot, collection, desc.name, wait=True))
        deleted.append(PeerSnapshot(peer, collection, desc.name, int(desc.size), desc.checksum))
    return deleted


def recover(connect: Connect, collection: str, locations: Mapping[str, str], api_key: str | None = None,
            checksums: Mapping[str, str] | None = None) -> None:
    """Recovers ``collection`` on each peer from that peer's snapshot, the snapshot winning over replicas.

    Args:
        connect: a REST client for one peer's URL.
        collection: the collection; Qdrant creates it when it does not exist.
        locations: peer REST URL -> where that peer downloads its snapshot from (an http(s) URL, such as a
            pre-signed object-store URL, or ``file:///qdrant/snapshots/...`` on the peer itself).
        api_key: sent with the download when the location needs one (another Qdrant's snapshot URL).
        checksums: peer REST URL -> the snapshot's SHA-256, checked by Qdrant before recovery.
    """
    for peer, location in locations.items():
        checksum = (checksums or {}).get(peer)
        _call(f"recover {collection!r} on {peer}", partial(
            connect(peer).recover_snapshot, collection, location, api_key=api_key, checksum=checksum,
            priority=models.SnapshotPriority.SNAPSHOT, wait=True))


def restore_aliases(store: QdrantStore, aliases: Mapping[str, str]) -> None:
    """Points each alias at its collection again (collection snapshots do not carry aliases)."""
    for alias, collection in aliases.items():
        store.set_alias(alias, collection)


def _connector(api_key: str | None, timeout: int) -> Connect:
    def connect(url: str) -> QdrantClient:
        # REST: snapshot recovery has no gRPC call, and one protocol keeps the job simple.
        return QdrantClient(url=url, api_key=api_key, prefer_grpc=False, timeout=timeout,
                            check_compatibility=False)
    return connect


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m services.search.snapshots create|recover``; Qdrant from ``SEARCH_URL`` and ``SEARCH_API_KEY``."""
    parser = argparse.ArgumentParser(prog="python -m services.search.snapshots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one Qdrant call may take")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="snapshot every collection on every peer; print the manifest")
    create.add_argument("--collection", action="append", default=[], help="only this collection (repeatable)")
    create.add_argument("--keep", type=int, default=0, help="snapshots kept per peer and collection (0: all)")
    rec = sub.add_parser("recover", help="recover one collection, each peer from its own snapshot")
    rec.add_argument("--collection", required=True)
    rec.add_argument("--location", action="append", required=True, metavar="PEER_URL=SNAPSHOT_URL",
                     help="where the peer at PEER_URL downloads its snapshot from (repeat for every peer)")
    args = parser.parse_args(argv)
    try:
        overrides: dict[str, Any] = {"backend": "server"}  # the rest from SEARCH_* variables
        settings = SearchSettings(**overrides)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = str(settings.url)  # the server backend's validator has required it
    connect = _connector(settings.api_key, args.timeout)
    try:
        if args.command == "create":
            manifest = create_snapshots(connect(url), url, connect, args.collection, args.keep)
            print(manifest.to_json(), flush=True)
            return 0
        if not all("=" in item for item in args.location):
            parser.error("--location takes PEER_URL=SNAPSHOT_URL")
        locations = dict(item.split("=", 1) for item in args.location)
        recover(connect, args.collection, locations)
        print(f"recovered {args.collection!r} on {len(locations)} peer(s)", flush=True)
        return 0
    except ServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
