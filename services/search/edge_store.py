"""``VectorStore`` on Qdrant Edge (``qdrant-edge-py``): one in-process Edge shard per collection.

Layout of the data directory::

    <data_dir>/.lock                          held (flock) while a store has the directory open
    <data_dir>/aliases.json                   {"aliases": {alias: collection}}, replaced atomically
    <data_dir>/collections/<name>/collection.json   name, dim, model, dataset
    <data_dir>/collections/<name>/current.json      {"generation": N}: the shard directory in use
    <data_dir>/collections/<name>/shard/      the Edge shard of generation 0 (segments, write-ahead log)
    <data_dir>/collections/<name>/shard-<N>/  the Edge shard of generation N >= 1 (after N index builds)

A collection without ``current.json`` is at generation 0 (``shard/``): new collections, and every
data directory written before index builds moved out of the process.

What Edge gives and what is added here:

- Durability is Edge's: ``EdgeShard.update`` appends the operation to the shard's write-ahead log
  before it returns, and ``EdgeShard.load`` recovers from it, so a write survives a killed process;
  ``sync`` (``EdgeShard.flush``) fsyncs log and segments, so it also survives power loss.
- HNSW, payload indexes (keyword on ``dataset`` and ``labels``, keyword with prefix matching on
  ``path``), filtered and exact search and batched queries are Edge's.
- Edge runs no background optimizer ("optimizations are manual"), and ``EdgeShard.optimize`` holds
  the Python GIL for the whole HNSW build, during which no other thread of the process (gRPC,
  health) would run. So the build runs on a copy in a child process (``services.search.edge_build``),
  once a collection has had no writes for ``index_idle_seconds``:

  1. writes to the collection wait while its shard is flushed and its directory copied to
     ``shard-<N+1>``; from then on every write is applied to the live shard as before *and* recorded;
  2. the child (nice 10, so serving wins the CPU) loads the copy, optimises it, closes and fsyncs it
     and reads it back into the page cache; the service waits for it without holding the GIL and
     keeps answering from the live shard (exact scan where nothing is indexed yet);
  3. the service loads the new generation, replays the recorded writes (all but the last few while
     writes go on), then, with writes held, replays the rest, flushes, switches ``current.json``
     atomically and swaps the shard that queries use; the old shard is closed and its directory
     removed. Queries never wait on a lock: one that still holds the old shard retries on the new.

  Before the switch the old generation is authoritative (a crash leaves a stray copy, removed at
  the next start); after it the new one holds every acknowledged write, since it was flushed first.
  A build is abandoned (copy removed, collection still pending, rebuilt once idle again) when the
  collection is deleted, the store closes, or more than ``max_build_delta_points`` points are
  written during it. A restart after a crash flushes the replayed log while it opens each
  collection (100k x 384-d unflushed: 3.4 s), before serving.

  Measured at 100k x 384-d on 2 cores shared with other jobs: build 31-48 s in all; writes held
  0.13-0.6 s for the copy and 0.01-0.02 s for the swap; the GIL held 0.08-0.2 s by the load of the
  new generation and 0.1-0.2 s by the close of the old one; health and Search (every 25 ms) p99
  75-205 ms during the build at load averages of 3.7-4.5 (before it: 30-45 ms), but 0.37-1.4 s
  when other jobs pushed the load average to 6-13 and the service itself got too little CPU.
- Edge scans on one core with the GIL held, so an exact-only collection (never indexed: every query
  is a scan) also keeps its vectors in memory and answers unfiltered queries as BLAS matrix products
  (``services.search.exact_scan``; kept in step under the write lock, read back after a restart).
- Edge has one shard and no collections or aliases, so collection metadata and aliases are small
  JSON files here, written atomically (temp file, fsync, rename, fsync of the directory). Creating
  or deleting a collection renames a whole directory, so a crash leaves it either complete or absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import qdrant_edge as qe

from services.common.errors import AlreadyExists, FailedPrecondition, Internal, NotFound, Unavailable
from services.common.files import atomic_write_text, fsync_dir
from services.common.priority import call_lowered
from services.search.edge_build import DEFAULT_NICENESS
from services.search.exact_scan import ExactScan
from services.search.store import (
    CollectionMeta,
    CollectionStats,
    Filter,
    Hit,
    IndexParams,
    IndexStatus,
    Payload,
    Point,
    Query,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_META_FILE = "collection.json"
_CURRENT_FILE = "current.json"
_SHARD_DIR = "shard"
_FORMAT = 1
# Payload indexes of every collection: keyword for exact matches, keyword with prefix for paths.
_PAYLOAD_INDEXES: tuple[tuple[str, qe.KeywordIndexParams], ...] = (
    ("dataset", qe.KeywordIndexParams()),
    ("labels", qe.KeywordIndexParams()),
    ("path", qe.KeywordIndexParams(prefix=True)),
)
# Writes recorded during a build are held in memory until the swap (about dim x 4 bytes per point:
# 50k points at 384-d are 77 MB, at 1280-d 256 MB). A delta larger than this also means the build is
# stale before it lands, so it is abandoned and the collection rebuilt once writes pause again.
MAX_BUILD_DELTA_POINTS = 50_000
# Qdrant Edge holds the GIL for the whole of a query call: other threads of this process ran at 3-6%
# of their speed during one (measured). One SearchBatch of 256 exact queries over 8,677 x 1280-d
# points is 175 ms of scanning on this machine, and every other RPC of the service, health checks
# included, waited for it. So a batch reaches Edge in slices that each scan at most this many vector
# components (points x dim per scanned query; ~10 ms on one core at the ~16 G components/s measured
# here), and other threads get the GIL between slices. An Edge call costs ~1 ms of its own on such a
# collection, so slices are no smaller than this needs.
SCAN_COMPONENTS_PER_CALL = 160_000_000
# Largest in-memory copy of an exact-only collection's vectors (see ``services.search.exact_scan``):
# 1 GiB is 210k points at 1280-d, 700k at 384-d.
EXACT_SCAN_MAX_BYTES = 1 << 30
# Queries per Edge call when the collection is indexed and the queries use the index (~0.3 ms each).
INDEXED_QUERIES_PER_CALL = 32
# At the swap, recorded writes are replayed onto the new shard while writes go on until at most this
# many operations are left; those are replayed with writes held (each is one upsert message).
_REPLAY_UNDER_LOCK = 4
# The directory that holds the ``services`` package, so that the child can import it however the
# service was started (installed, PYTHONPATH, or sys.path set by a script).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
BUILD_STEPS = ("copied", "spawned", "built", "loaded", "replayed", "flushed", "switched", "swapped", "removed")
"""The steps of an index build, in order, as passed to ``EdgeStore``'s ``build_hook`` (tests kill the
process at each to check crash safety): ``copied`` the copy is taken and writes are recorded;
``spawned`` the child process started; ``built`` it finished; ``loaded`` the new generation is open
in the service; ``replayed`` all but the tail of the recorded writes replayed onto it; ``flushed``
the tail replayed and the new shard flushed (writes held, ``current.json`` not yet switched);
``switched`` ``current.json`` names the new generation and queries use it (writes still held);
``swapped`` writes go on; ``removed`` the old generation is closed and its directory removed."""


def shard_dir_name(generation: int) -> str:
    """The directory of a collection's shard of ``generation`` (0: ``shard``, the original layout)."""
    return _SHARD_DIR if generation == 0 else f"{_SHARD_DIR}-{generation}"


def write_json_atomic(path: Path, data: object) -> None:
    """Replaces ``path`` with ``data`` as JSON so that a crash leaves the old or the new file, never half."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def edge_filter(flt: Filter | None, exclude_ids: Sequence[str] = ()) -> qe.Filter | None:
    """The Edge filter for payload conditions and excluded ids (None when there is neither)."""
    must: list[Any] = []
    if flt is not None:
        if flt.labels_any:
            must.append(qe.FieldCondition("labels", match=qe.MatchAny(list(flt.labels_any))))
        if flt.dataset:
            must.append(qe.FieldCondition("dataset", match=qe.MatchValue(flt.dataset)))
        if flt.path_prefix:
            must.append(qe.FieldCondition("path", match=qe.MatchPrefix(flt.path_prefix)))
    must_not: list[Any] = [qe.HasIdCondition(set(exclude_ids))] if exclude_ids else []
    if not must and not must_not:
        return None
    return qe.Filter(must=must or None, must_not=must_not or None)


def _vector(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _read_generation(collection_dir: Path) -> int:
    current = collection_dir / _CURRENT_FILE
    if not current.is_file():
        return 0
    return int(json.loads(current.read_text(encoding="utf-8"))["generation"])


class _Abandoned(Exception):
    """An index build stopped before its switch; its copy is removed and the collection stays pending."""


@dataclass(frozen=True)
class BuildReport:
    """What one index build of a collection took (all times in seconds, wall clock).

    Attributes:
        collection: the collection's name.
        generation: the shard generation the build produced.
        optimized: whether Edge found anything to optimise (False: the copy was dropped, no swap).
        copy_seconds: flush and copy of the live shard, during which writes to it waited.
        child_seconds: the child process, start to exit (load, optimise, close, fsync of the copy).
        load_seconds: ``EdgeShard.load`` of the new generation in the service (holds the GIL).
        replayed_ops: write operations recorded during the build and replayed onto the new shard.
        swap_seconds: replay of the tail, flush, switch of ``current.json`` and the swap itself,
            during which writes waited (queries do not wait on it, only for the GIL).
        close_seconds: ``EdgeShard.close`` of the old generation and removal of its directory.
        total_seconds: from the start of the copy to the old generation's removal.
    """

    collection: str
    generation: int
    optimized: bool
    copy_seconds: float
    child_seconds: float
    load_seconds: float = 0.0
    replayed_ops: int = 0
    swap_seconds: float = 0.0
    close_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class _Build:
    """An index build in progress: its target generation, child process and the writes it recorded."""

    generation: int
    path: Path
    # Set (under the collection's write lock) once the copy is taken: from then on writes are recorded.
    recording: bool = False
    ops: list[qe.UpdateOperation] = field(default_factory=list)
    points: int = 0  # points upserted or deleted by the recorded operations
    process: subprocess.Popen[str] | None = None
    abandoned: str | None = None  # why the build is being abandoned, or None

    def abandon(self, reason: str) -> None:
        """Stops the build at its next step (the child is killed now); idempotent, from any thread."""
        if self.abandoned is None:
            self.abandoned = reason
        self.recording = False
        self.ops = []  # the recorded writes are no longer needed: free their memory now
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                process.kill()


@dataclass
class _Collection:
    """An open collection and its indexing state."""

    meta: CollectionMeta
    path: Path
    shard: qe.EdgeShard
    generation: int = 0
    # Serialises writes (update, flush) with the copy and the swap of an index build. Queries never
    # take it: they read ``shard`` once and retry on the new one if it was swapped under them.
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    # Held for the whole of an index build; closing or deleting the collection takes it to wait for
    # a build it has abandoned to clean up.
    build_lock: threading.Lock = field(default_factory=threading.Lock)
    # time.monotonic() of the last write not yet covered by an index build; 0.0 when clean.
    dirty_since: float = 0.0
    build: _Build | None = None  # the build in progress, if any
    closed: bool = False
    index_error: str | None = None
    # Exact-only collections: their vectors in memory, for exact queries as matrix products
    # (``services.search.exact_scan``); ``scan_pending`` while it is to be read from Edge (after a
    # restart) on first use. None and not pending: queries go to Edge (not exact-only, too large).
    scan: ExactScan | None = None
    scan_pending: bool = False

    @property
    def shard_path(self) -> Path:
        return self.path / shard_dir_name(self.generation)


class EdgeStore:
    """Collections as Qdrant Edge shards in ``data_dir`` (see the module docstring)."""

    backend = "edge"

    def __init__(self, data_dir: Path, params: IndexParams | None = None, *, search_threads: int = 0,
                 index_idle_seconds: float | None = 2.0,
                 on_index_built: Callable[[str, float], None] | None = None,
                 max_build_delta_points: int = MAX_BUILD_DELTA_POINTS, build_niceness: int = DEFAULT_NICENESS,
                 build_hook: Callable[[str], None] | None = None,
                 scan_components_per_call: int = SCAN_COMPONENTS_PER_CALL, search_niceness: int = 0,
                 exact_scan_max_bytes: int = EXACT_SCAN_MAX_BYTES) -> None:
        """Opens (or creates) the data directory and every collection in it, replaying their logs.

        Args:
            data_dir: the directory; created when missing.
            params: HNSW parameters of new collections and the search ``ef``.
            search_threads: Edge search threads per collection (0: Edge's default, one per CPU).
            index_idle_seconds: build pending indexes once a collection had no writes for this
                long; None: never on its own (call ``optimize``).
            on_index_built: called with (collection, seconds) after each index build that swapped
                in a new generation.
            max_build_delta_points: abandon a build when more points than this are written to the
                collection while it runs (see ``MAX_BUILD_DELTA_POINTS``).
            build_niceness: niceness increment of the build process (0: same priority as the service).
            build_hook: tests only: called with each step of ``BUILD_STEPS`` as a build completes it.
            scan_components_per_call: vector components (points x dim per query that scans) one
                Edge query call may scan; larger batches are sliced (see ``SCAN_COMPONENTS_PER_CALL``).
            search_niceness: nice value added to each shard's Edge search threads, which do the
                queries' work (``services.common.priority``), so the service's probes win the CPU.
            exact_scan_max_bytes: largest in-memory copy of an exact-only collection's vectors that
                answers its unfiltered queries as matrix products (``services.search.exact_scan``);
                0: every query goes to Edge.

        Raises:
            FailedPrecondition: another process has the directory open.
        """
        self.params = params or IndexParams()
        self.data_dir = Path(data_dir)
        self._collections_dir = self.data_dir / "collections"
        self._collections_dir.mkdir(parents=True, exist_ok=True)
        self._search_threads = search_threads or None
        self._on_index_built = on_index_built
        self._max_build_delta = max_build_delta_points
        self._build_niceness = build_niceness
        self._build_hook = build_hook
        self._scan_per_call = scan_components_per_call
        self._search_niceness = search_niceness
        self._scan_max_bytes = exact_scan_max_bytes
        self.last_build: BuildReport | None = None
        """The report of the latest build that ran to its end (tests, benchmarks)."""
        self._lock = threading.RLock()  # collection and alias lifecycle
        self._lock_fd = self._lock_data_dir()
        self._collections: dict[str, _Collection] = {}
        self._aliases: dict[str, str] = {}
        self._stop = threading.Event()
        self._indexer: threading.Thread | None = None
        try:
            self._load()
        except BaseException:
            self._release_data_dir()
            raise
        if index_idle_seconds is not None:
            self._indexer = threading.Thread(target=self._index_loop, args=(index_idle_seconds,),
                                             name="edge-indexer", daemon=True)
            self._indexer.start()

    # -- lifecycle -------------------------------------------------------------------------------

    def _lock_data_dir(self) -> int:
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"data dir {self.data_dir} is in use by another search service") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _release_data_dir(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def _load(self) -> None:
        for entry in sorted(self._collections_dir.iterdir()):
            if entry.name.startswith("."):
                # A creation or deletion that a crash interrupted: never visible, so finish removing it.
                log.warning("removing leftover %s", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            meta_file = entry / _META_FILE
            if not meta_file.is_file():
                log.warning("skipping %s: no %s", entry, _META_FILE)
                continue
            data = json.loads(meta_file.read_text(encoding="utf-8"))
            meta = CollectionMeta(name=data["name"], dim=int(data["dim"]), model=data.get("model", ""),
                                  dataset=data.get("dataset", ""), exact_only=bool(data.get("exact_only", False)))
            generation = _read_generation(entry)
            self._remove_stray_generations(entry, generation)
            start = time.monotonic()
            shard_path = entry / shard_dir_name(generation)
            shard = self._load_shard(shard_path, meta.dim)
            # After a crash the log's replayed writes are in memory only, and the first flush writes
            # them all with the GIL held (100k x 384-d: 1.3 s, measured): do it now, before the server
            # answers anything, rather than in the first synced Upsert or the first index build.
            shard.flush()
            collection = _Collection(meta=meta, path=entry, shard=shard, generation=generation,
                                     scan_pending=self._scanned(meta))
            # Whether an index build is pending is not visible from outside: let the indexer look.
            collection.dirty_since = time.monotonic()
            self._collections[meta.name] = collection
            log.info("loaded collection %s (%d points, generation %d) in %.2f s", meta.name,
                     shard.info().points_count, generation, time.monotonic() - start)
        aliases_file = self.data_dir / "aliases.json"
        if aliases_file.is_file():
            aliases = json.loads(aliases_file.read_text(encoding="utf-8")).get("aliases", {})
            self._aliases = {a: c for a, c in aliases.items() if c in self._collections}

    @staticmethod
    def _remove_stray_generations(collection_dir: Path, generation: int) -> None:
        """Removes shard directories other than ``generation``'s, and temp files of atomic writes.

        A crash before a build's switch leaves its copy (never authoritative); a crash after it may
        leave the previous generation (superseded): neither holds anything the current one lacks.
        """
        keep = shard_dir_name(generation)
        for child in collection_dir.iterdir():
            stray_shard = child.is_dir() and (child.name == _SHARD_DIR or child.name.startswith(f"{_SHARD_DIR}-"))
            if (stray_shard and child.name != keep) or (child.name.startswith(".") and child.name.endswith(".tmp")):
                log.warning("removing %s (left by an interrupted index build)", child)
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def close(self) -> None:
        """Abandons index builds, stops the indexer, flushes and closes every shard, releases the directory."""
        self._stop.set()
        for collection in list(self._collections.values()):
            self._abandon_build(collection, "the store is closing")
        if self._indexer is not None:
            self._indexer.join()
        with self._lock:
            for collection in self._collections.values():
                with collection.build_lock, collection.write_lock:
                    if not collection.closed:
                        collection.closed = True
                        collection.shard.close()
            self._collections.clear()
            self._release_data_dir()

    def ping(self) -> None:
        if self._lock_fd < 0:
            raise Unavailable("the edge store is closed")

    # -- collections and aliases ------------------------------------------------------------------

    def _config(self, dim: int, creating: bool) -> qe.EdgeConfig:
        vectors = qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)
        if not creating:
            # Index parameters are fixed at creation; only runtime settings are applied on load.
            return qe.EdgeConfig(vectors=vectors, max_search_threads=self._search_threads)
        p = self.params
        return qe.EdgeConfig(
            vectors=vectors,
            hnsw_config=qe.HnswIndexConfig(m=p.m, ef_construct=p.ef_construct, full_scan_threshold=10_000),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=p.indexing_threshold_kb),
            max_search_threads=self._search_threads,
            wal_enabled=True,
        )

    def create_collection(self, meta: CollectionMeta) -> None:
        with self._lock:
            self._check_name_free(meta.name)
            staging = self._collections_dir / f".creating-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                (staging / _META_FILE).write_text(json.dumps({
                    "format": _FORMAT, "name": meta.name, "dim": meta.dim, "model": meta.model,
                    "exact_only": meta.exact_only,
                    "dataset": meta.dataset}, indent=1), encoding="utf-8")
                shard = qe.EdgeShard.create(str(staging / _SHARD_DIR), self._config(meta.dim, creating=True))
                for name, params in _PAYLOAD_INDEXES:
                    shard.update(qe.UpdateOperation.create_field_index(name, params))
                shard.close()  # the shard keeps its path: rename only while it is closed
                final = self._collections_dir / meta.name
                fsync_dir(staging)
                os.replace(staging, final)
                fsync_dir(self._collections_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shard = self._load_shard(final / _SHARD_DIR, meta.dim)
            scan = ExactScan(meta.dim, self._scan_max_bytes) if self._scanned(meta) else None
            self._collections[meta.name] = _Collection(meta=meta, path=final, shard=shard, scan=scan)

    def _scanned(self, meta: CollectionMeta) -> bool:
        """Whether the collection keeps its vectors in memory for exact queries (``ExactScan``)."""
        return meta.exact_only and self._scan_max_bytes > 0

    def _load_shard(self, path: Path, dim: int) -> qe.EdgeShard:
        """Loads a shard; its search threads (started by the load) run at ``search_niceness``."""
        config = self._config(dim, creating=False)
        return call_lowered(self._search_niceness, lambda: qe.EdgeShard.load(str(path), config))

    def _check_name_free(self, name: str) -> None:
        if name in self._collections:
            raise AlreadyExists(f"collection {name!r} already exists")
        if name in self._aliases:
            raise AlreadyExists(f"{name!r} is an alias of collection {self._aliases[name]!r}")

    def delete_collection(self, name: str) -> bool:
        with self._lock:
            collection = self._collections.pop(name, None)
            if collection is None:
                return False
            collection.closed = True
            self._abandon_build(collection, "the collection was deleted")
            # A build notices within one step (its child is killed) and removes its copy.
            with collection.build_lock, collection.write_lock:
                collection.shard.close()
            remaining = {a: c for a, c in self._aliases.items() if c != name}
            if remaining != self._aliases:
                self._write_aliases(remaining)
            tomb = self._collections_dir / f".deleting-{uuid.uuid4().hex}"
            os.replace(collection.path, tomb)
            fsync_dir(self._collections_dir)
            shutil.rmtree(tomb, ignore_errors=True)
            return True

    def list_collections(self) -> list[CollectionMeta]:
        return [c.meta for c in list(self._collections.values())]

    def resolve(self, name: str) -> CollectionMeta:
        collection = self._collections.get(name)
        if collection is None:
            target = self._aliases.get(name)
            collection = self._collections.get(target) if target is not None else None
        if collection is None:
            raise NotFound(f"no collection or alias named {name!r}")
        return collection.meta

    def stats(self, name: str) -> CollectionStats:
        collection = self._get(name)
        points = self._call(collection, lambda s: s.info().points_count)
        if collection.index_error:
            status = IndexStatus.RED
        elif (collection.dirty_since and not collection.meta.exact_only) or collection.build is not None:
            status = IndexStatus.YELLOW
        else:
            status = IndexStatus.GREEN
        return CollectionStats(points_count=points, status=status)

    def set_alias(self, alias: str, collection: str) -> None:
        with self._lock:
            if collection not in self._collections:
                raise NotFound(f"no collection named {collection!r}")
            if alias in self._collections:
                raise AlreadyExists(f"{alias!r} is a collection; an alias cannot take its name")
            self._write_aliases({**self._aliases, alias: collection})

    def delete_alias(self, alias: str) -> bool:
        with self._lock:
            if alias not in self._aliases:
                return False
            self._write_aliases({a: c for a, c in self._aliases.items() if a != alias})
            return True

    def list_aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        # File first: if it cannot be written, the aliases in memory stay as they were.
        write_json_atomic(self.data_dir / "aliases.json", {"format": _FORMAT, "aliases": aliases})
        self._aliases = aliases  # one reference swap: readers see the old or the new map

    # -- points ----------------------------------------------------------------------------------

    def _get(self, name: str) -> _Collection:
        collection = self._collections.get(name)
        if collection is None:
            raise NotFound(f"no collection named {name!r}")
        return collection

    def _call(self, collection: _Collection, fn: Callable[[qe.EdgeShard], _T]) -> _T:
        shard = collection.shard
        try:
            return fn(shard)
        except Exception as exc:
            if collection.closed:
                raise NotFound(f"collection {collection.meta.name!r} was deleted") from exc
            if collection.shard is not shard:
                # An index build swapped in a new generation and closed this one between our read of
                # ``shard`` and the call: the new one holds everything, so ask it instead.
                return self._call(collection, fn)
            raise Internal(f"edge engine, collection {collection.meta.name!r}: {exc}") from exc

    def _write(self, target: _Collection, operation: qe.UpdateOperation, points: int,
               scan_write: Callable[[ExactScan], bool]) -> None:
        """Applies a write to the live shard, to the in-memory vectors (``scan_write``; False: they
        outgrew their bound, and queries go to Edge from now on) and, while a build records, to its
        delta."""
        with target.write_lock:
            self._call(target, lambda s: s.update(operation))
            # Under the lock with the write, so that a build's copy either has it or records it, and
            # a search of the scan sees the write or not, never half of it.
            if target.scan is not None and not scan_write(target.scan):
                log.info("collection %s outgrew the exact-scan memory bound (%d bytes): exact queries go to Edge",
                         target.meta.name, self._scan_max_bytes)
                target.scan = None
            target.dirty_since = time.monotonic()
            build = target.build
            if build is not None and build.recording:
                build.points += points
                if build.points > self._max_build_delta:
                    build.abandon(f"more than {self._max_build_delta} points were written during the build")
                else:
                    build.ops.append(operation)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        target = self._get(collection)
        operation = qe.UpdateOperation.upsert_points(
            [qe.Point(p.id, p.vector.tolist(), p.payload.to_dict()) for p in points])
        self._write(target, operation, len(points), lambda scan: scan.upsert(
            [p.id for p in points], np.stack([p.vector for p in points]) if points else np.empty((0, scan.dim))))

    def sync(self, collection: str) -> None:
        target = self._get(collection)
        with target.write_lock:  # a flush must not overlap a build's copy of the files it writes
            self._call(target, lambda s: s.flush())

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        target = self._get(collection)
        self._write(target, qe.UpdateOperation.delete_points(list(ids)), len(ids),
                    lambda scan: scan.delete(ids) >= 0)  # deleting never outgrows the bound: always True

    def retrieve(self, collection: str, ids: Sequence[str], with_vector: bool) -> list[Point]:
        target = self._get(collection)
        records = self._call(target, lambda s: s.retrieve(list(ids), with_payload=True, with_vector=with_vector))
        return [Point(id=str(r.id), vector=_vector(r.vector) if with_vector else np.empty(0, np.float32),
                      payload=Payload.from_dict(r.payload)) for r in records]

    def _request(self, query: Query) -> qe.QueryRequest:
        return qe.QueryRequest(
            limit=query.limit,
            query=qe.Query.Nearest(query.vector.tolist()),
            filter=edge_filter(query.filter, query.exclude_ids),
            params=qe.SearchParams(hnsw_ef=self.params.search_ef(query.limit), exact=query.exact),
            with_payload=query.with_payload,
            with_vector=query.with_vector,
        )

    def stored_vectors(self, collection: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        target = self._get(collection)
        scan = self._scan(target)
        if scan is not None:
            return scan.vectors(ids)
        records = self._call(target, lambda s: s.retrieve(list(ids), with_payload=False, with_vector=True))
        return {str(r.id): _vector(r.vector) for r in records}

    def _scan(self, target: _Collection) -> ExactScan | None:
        """The collection's in-memory vectors, read from Edge first if a restart left them pending;
        None when its queries go to Edge."""
        if not target.scan_pending:
            return target.scan
        with target.write_lock:  # no write between the read and the switch
            if target.scan_pending:
                target.scan = self._read_scan(target)
                target.scan_pending = False
        return target.scan

    def _read_scan(self, target: _Collection) -> ExactScan | None:
        scan = ExactScan(target.meta.dim, self._scan_max_bytes)
        start = time.monotonic()
        if not scan.fits(self._call(target, lambda s: s.info().points_count)):
            return None
        offset = None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=4096, with_payload=False, with_vector=True)
            records, offset = self._call(target, lambda s: s.scroll(request))  # noqa: B023 (called at once)
            if records:
                scan.upsert([str(r.id) for r in records], np.asarray([r.vector for r in records], dtype=np.float32))
            if offset is None:
                break
        log.info("read %d vectors of exact-only collection %s into memory in %.2f s", len(scan), target.meta.name,
                 time.monotonic() - start)
        return scan

    def query(self, collection: str, queries: Sequence[Query]) -> list[list[Hit]]:
        target = self._get(collection)
        scan = self._scan(target)
        # The in-memory scan answers what it answers exactly as Edge would: every query without a
        # payload filter. The rest (and everything on other collections) goes to Edge.
        scanned: list[int] = []
        rest: list[int] = []
        for i, q in enumerate(queries):
            (scanned if scan is not None and q.filter is None else rest).append(i)
        results: list[list[Hit]] = [[] for _ in queries]
        if scan is not None and scanned:
            chosen = [queries[i] for i in scanned]
            answers = scan.search(np.stack([q.vector for q in chosen]), [q.limit for q in chosen],
                                  [q.exclude_ids for q in chosen], with_vectors=any(q.with_vector for q in chosen))
            payloads = self._payloads(target, {pid for q, a in zip(chosen, answers, strict=True) if q.with_payload
                                               for pid in a.ids})
            for i, q, a in zip(scanned, chosen, answers, strict=True):
                if not (q.with_payload or q.with_vector):  # evaluation: ~10^6 hits per run, kept lean
                    results[i] = list(map(Hit, a.ids.tolist(), a.scores.tolist()))
                    continue
                vectors = a.vectors if q.with_vector else None
                results[i] = [Hit(pid, score, payloads.get(pid) if q.with_payload else None,
                                  vectors[j] if vectors is not None else None)
                              for j, (pid, score) in enumerate(zip(a.ids.tolist(), a.scores.tolist(), strict=True))]
        if rest:
            for i, hits in zip(rest, self._edge_query(target, [queries[i] for i in rest]), strict=True):
                results[i] = hits
        return results

    def _payloads(self, target: _Collection, ids: set[str]) -> dict[str, Payload]:
        if not ids:
            return {}
        records = self._call(target, lambda s: s.retrieve(list(ids), with_payload=True, with_vector=False))
        return {str(r.id): Payload.from_dict(r.payload) for r in records}

    def _edge_query(self, target: _Collection, queries: Sequence[Query]) -> list[list[Hit]]:
        requests = [self._request(q) for q in queries]
        if len(requests) == 1:
            results = [self._call(target, lambda s: s.query(requests[0]))]
        else:
            size = self._queries_per_call(target, queries)
            results = []
            for start in range(0, len(requests), size):
                part = qe.QueryBatchRequest(requests[start:start + size])
                results += self._call(target, lambda s: s.query_batch(part))  # noqa: B023 (called at once)
        return [[Hit(id=str(p.id), score=float(p.score),
                     payload=Payload.from_dict(p.payload) if q.with_payload else None,
                     vector=_vector(p.vector) if q.with_vector else None) for p in points]
                for q, points in zip(queries, results, strict=True)]

    def _queries_per_call(self, target: _Collection, queries: Sequence[Query]) -> int:
        """How many of ``queries`` one Edge call may take (see ``SCAN_COMPONENTS_PER_CALL``)."""
        info = self._call(target, lambda s: s.info())
        if not any(q.exact for q in queries) and info.indexed_vectors_count >= info.points_count:
            return INDEXED_QUERIES_PER_CALL
        return max(1, self._scan_per_call // max(1, info.points_count * target.meta.dim))

    def count(self, collection: str, filter: Filter | None) -> int:
        target = self._get(collection)
        request = qe.CountRequest(exact=True, filter=edge_filter(filter))
        return int(self._call(target, lambda s: s.count(request)))

    def scroll(self, collection: str, filter: Filter | None, limit: int, offset: str | None,
               with_vector: bool) -> tuple[list[Point], str | None]:
        target = self._get(collection)
        request = qe.ScrollRequest(offset=offset, limit=limit, filter=edge_filter(filter), with_payload=True,
                                   with_vector=with_vector)
        records, next_offset = self._call(target, lambda s: s.scroll(request))
        points = [Point(id=str(r.id), vector=_vector(r.vector) if with_vector else np.empty(0, np.float32),
                        payload=Payload.from_dict(r.payload)) for r in records]
        return points, (str(next_offset) if next_offset is not None else None)

    # -- indexing --------------------------------------------------------------------------------

    def optimize(self, collection: str) -> None:
        """Builds the collection's pending index now (in a child process) and waits for the swap.

        Raises:
            NotFound: the collection does not exist or was deleted during the build.
            Unavailable: the build was abandoned (store closing, too many writes meanwhile); retryable.
            Internal: the build failed (the status is RED until a later build succeeds).
        """
        target = self._get(collection)
        try:
            self._build(target, retry_failed=True)
        except _Abandoned as exc:
            if target.closed:
                raise NotFound(f"collection {collection!r} was deleted during its index build") from None
            raise Unavailable(f"index build of {collection!r} was abandoned: {exc}; retry") from None
        if target.index_error:
            raise Internal(f"index build of {collection!r} failed: {target.index_error}")

    def _abandon_build(self, collection: _Collection, reason: str) -> None:
        with collection.write_lock:  # pairs with the build's checks, which are made under it
            build = collection.build
            if build is not None:
                build.abandon(reason)

    def _step(self, name: str) -> None:
        if self._build_hook is not None:
            self._build_hook(name)

    def _build(self, collection: _Collection, retry_failed: bool = False) -> BuildReport | None:
        """Runs one index build of ``collection`` if it has writes not yet covered by one (or, with
        ``retry_failed``, if the last build failed).

        Returns the report, or None when there was nothing to build. Raises ``_Abandoned`` when the
        build was abandoned; a failed build sets ``index_error`` (status RED) and returns None.
        """
        with collection.build_lock:
            if collection.closed or not (collection.dirty_since or (retry_failed and collection.index_error)):
                return None
            generation = collection.generation + 1
            build = _Build(generation=generation, path=collection.path / shard_dir_name(generation))
            with collection.write_lock:
                collection.build = build
                if collection.closed or self._stop.is_set():
                    build.abandon("the collection was deleted" if collection.closed else "the store is closing")
            try:
                report = self._run_build(collection, build)
            except _Abandoned as exc:
                log.info("index build of %s abandoned: %s", collection.meta.name, exc)
                raise
            except Exception as exc:
                # Not retried in a loop: the status turns RED and the next write (or optimize) retries.
                collection.index_error = str(exc)
                log.error("index build of %s failed: %s", collection.meta.name, exc)
                return None
            finally:
                with collection.write_lock:
                    if collection.build is build:
                        collection.build = None
                if collection.generation != generation:  # not swapped in: the copy is garbage
                    shutil.rmtree(build.path, ignore_errors=True)
        self.last_build = report
        if report.optimized:
            log.info("index build of %s (generation %d): %.2f s in all; copy %.2f s, child %.2f s, load %.2f s, "
                     "%d writes replayed, writes held %.3f s for the swap, old shard closed in %.2f s",
                     collection.meta.name, report.generation, report.total_seconds, report.copy_seconds,
                     report.child_seconds, report.load_seconds, report.replayed_ops, report.swap_seconds,
                     report.close_seconds)
            if self._on_index_built is not None:
                self._on_index_built(collection.meta.name, report.total_seconds)
        else:
            log.info("index build of %s (generation %d): nothing to optimise, copy dropped; %.2f s in all; copy "
                     "%.2f s, child %.2f s", collection.meta.name, report.generation, report.total_seconds,
                     report.copy_seconds, report.child_seconds)
        return report

    def _run_build(self, collection: _Collection, build: _Build) -> BuildReport:
        """Copy, child, swap (the module docstring's steps 1-3) for ``build``; see ``_build``."""
        name = collection.meta.name
        shutil.rmtree(build.path, ignore_errors=True)  # an abandoned build's copy, should one be left
        log.info("index build of %s (generation %d) started", name, build.generation)
        start = time.monotonic()
        with collection.write_lock:
            if build.abandoned:
                raise _Abandoned(build.abandoned)
            self._call(collection, lambda s: s.flush())  # the files must hold what the shard holds
            shutil.copytree(collection.shard_path, build.path)
            stamp = collection.dirty_since
            build.recording = True
        copied = time.monotonic()
        self._step("copied")
        result = self._run_child(build)
        child_done = time.monotonic()
        self._step("built")
        report = BuildReport(collection=name, generation=build.generation, optimized=bool(result["optimized"]),
                             copy_seconds=copied - start, child_seconds=child_done - copied)
        if report.optimized:
            report = self._swap(collection, build, report)
        # else nothing was left to index (after a restart, say): the live shard is as good as the copy.
        with collection.write_lock:  # writes set dirty_since under it
            if collection.dirty_since == stamp:  # no write since the copy: the index covers every point
                collection.dirty_since = 0.0
        collection.index_error = None
        return dataclasses.replace(report, total_seconds=time.monotonic() - start)

    def _run_child(self, build: _Build) -> dict[str, Any]:
        """Runs ``services.search.edge_build`` on the copy and waits for it (without holding the GIL)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        command = [sys.executable, "-m", "services.search.edge_build", str(build.path),
                   "--nice", str(self._build_niceness), "--parent", str(os.getpid())]
        # The child shares the data directory's flock: while it lives, no second store opens the
        # directory (should it outlive a SIGKILLed service despite PR_SET_PDEATHSIG). Its own process
        # group, so that a terminal's Ctrl-C reaches the service, which then abandons the build; the
        # service's session, so that Linux's autogroup schedules it with the service and its nice
        # value counts against the service's threads (in a session of its own it got a full group's
        # share of the CPU whatever its nice value).
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   pass_fds=(self._lock_fd,), process_group=0)
        build.process = process
        if build.abandoned:
            process.kill()
        self._step("spawned")
        out, err = process.communicate()
        if build.abandoned:
            raise _Abandoned(build.abandoned)
        if process.returncode != 0:
            detail = err.strip().splitlines()[-1] if err.strip() else "no message"
            raise RuntimeError(f"index build process exited with status {process.returncode}: {detail}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def _swap(self, collection: _Collection, build: _Build, report: BuildReport) -> BuildReport:
        """Loads the new generation, replays the recorded writes and makes it the collection's shard."""
        start = time.monotonic()
        shard = self._load_shard(build.path, collection.meta.dim)
        loaded = time.monotonic()
        switched = False
        try:
            self._step("loaded")
            applied = 0
            # Catch up while writes go on; they keep being recorded behind the ones replayed here.
            while len(build.ops) - applied > _REPLAY_UNDER_LOCK and not build.abandoned:
                pending = build.ops[applied:]
                for operation in pending:
                    shard.update(operation)
                applied += len(pending)
            if applied:
                shard.flush()  # the first flush after a load is the slow one: not with writes held
            self._step("replayed")
            with collection.write_lock:
                if build.abandoned:
                    raise _Abandoned(build.abandoned)
                held = time.monotonic()
                tail = build.ops[applied:]
                for operation in tail:
                    shard.update(operation)
                applied += len(tail)
                if applied:
                    # Before the switch: a crash after it must find every acknowledged write. (The
                    # copy itself was flushed and fsynced by the child.)
                    shard.flush()
                self._step("flushed")
                old_shard, old_path = collection.shard, collection.shard_path
                try:
                    write_json_atomic(collection.path / _CURRENT_FILE,
                                      {"format": _FORMAT, "generation": build.generation})
                finally:
                    # Once the rename is done the new generation is authoritative, even should the
                    # directory's fsync after it have failed.
                    switched = _read_generation(collection.path) == build.generation
                    if switched:
                        collection.shard, collection.generation = shard, build.generation
                        build.recording = False
                self._step("switched")
                swapped = time.monotonic()
        except BaseException:
            if not switched:
                shard.close()
            raise
        self._step("swapped")
        old_shard.close()  # a query still holding it retries on the new shard (see _call)
        shutil.rmtree(old_path, ignore_errors=True)
        self._step("removed")
        return dataclasses.replace(report, load_seconds=loaded - start, replayed_ops=applied,
                                   swap_seconds=swapped - held, close_seconds=time.monotonic() - swapped)

    def _index_loop(self, idle_seconds: float) -> None:
        while not self._stop.wait(min(0.25, max(idle_seconds, 0.01))):
            now = time.monotonic()
            for collection in list(self._collections.values()):
                if self._stop.is_set():
                    return
                if collection.meta.exact_only:
                    continue  # never searched through an index: building one would only cost CPU
                if collection.dirty_since and now - collection.dirty_since >= idle_seconds:
                    with contextlib.suppress(_Abandoned):  # still dirty: built again once writes pause
                        self._build(collection)
