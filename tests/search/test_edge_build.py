"""Edge index builds off the service's GIL: queries, writes and health answer while an index builds.

The build of ``N`` x ``DIM`` random vectors takes several seconds on two cores (the HNSW build of
isotropic vectors is the slow case); under the old in-process ``EdgeShard.optimize`` every thread of
the process waited for all of it. Latency bounds are far below the build time but far above a
query's (a few ms), so a loaded machine does not fail them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import qdrant_edge as qe
from grpc_health.v1 import health_pb2, health_pb2_grpc
from retrieval.v1 import search_pb2, search_pb2_grpc

from services.common.clients import channel, wait_serving
from services.common.errors import Internal, NotFound, Unavailable
from services.search.config import SearchSettings
from services.search.edge_store import EdgeStore
from services.search.servicer import create_search_server
from services.search.store import CollectionMeta, IndexParams, IndexStatus, Payload, Point, Query, point_id

N = 25_000
DIM = 64
PARAMS = IndexParams(indexing_threshold_kb=1000)  # one HNSW build over every point
P99_BOUND_S = 0.25  # the acceptance bound for health and search during a build
MAX_BOUND_S = 1.0
MIN_BUILD_S = 2.0  # the build must be long enough for the bounds to mean something
INTERVAL_S = 0.02  # one call due every 20 ms, as a busy client or a tight probe


def _points(n: int, dim: int, seed: int, dataset: str = "ds") -> list[Point]:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return [Point(point_id(dataset, f"p{i}.jpg"), v, Payload(dataset, f"p{i}.jpg", ("a",)))
            for i, v in enumerate(vectors)]


def _fill(store: EdgeStore, name: str, n: int = N, dim: int = DIM) -> None:
    store.create_collection(CollectionMeta(name, dim))
    points = _points(n, dim, seed=0)
    for i in range(0, n, 2000):
        store.upsert(name, points[i:i + 2000])
    store.sync(name)


def _in_background(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised by the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _summary(latencies: list[float]) -> str:
    if not latencies:
        return "no calls"
    return f"{len(latencies)} calls, p50 {np.percentile(latencies, 50) * 1000:.1f} ms, " \
           f"p99 {np.percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms"


def _paced(calls: Sequence[Callable[[], object]], start: float, stop: Callable[[], bool],
           interval: float = INTERVAL_S) -> tuple[list[tuple[int, float, float]], list[str]]:
    """Makes the calls in turn, one due every ``interval`` s from ``start``, until ``stop()`` and caught up.

    Returns (which call, when it was due, when it was answered) per call, in ``time.monotonic()``
    seconds, and the errors. A call is timed from when it was due, not from when it was sent, and
    the calls that fell due during a stall are all made: a caller frozen with the service (the GIL)
    counts the stall as an outside prober would (no coordinated omission).
    """
    samples: list[tuple[int, float, float]] = []
    failures: list[str] = []
    due = start
    i = 0
    while not (stop() and due >= time.monotonic()):
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        which = i % len(calls)
        try:
            calls[which]()
        except Exception as exc:  # counted as a failure
            failures.append(repr(exc))
        samples.append((which, due, time.monotonic()))
        due += interval
        i += 1
    return samples, failures


def test_queries_and_writes_answer_during_an_index_build(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, PARAMS, index_idle_seconds=None)
    try:
        _fill(store, "c")
        rng = np.random.default_rng(1)
        written = _points(400, DIM, seed=2, dataset="during")
        n_written = [0]

        def query() -> None:
            hits = store.query("c", [Query(rng.standard_normal(DIM).astype(np.float32), 10, with_payload=False)])
            assert len(hits[0]) == 10

        def write() -> None:
            store.upsert("c", [written[n_written[0]]])
            n_written[0] += 1

        start = time.monotonic()
        builder, errors = _in_background(lambda: store.optimize("c"))
        # Writes come from another client than queries: a write waiting for the copy delays no query.
        write_samples: list[tuple[int, float, float]] = []
        write_failures: list[str] = []

        def writer() -> None:
            samples, failures = _paced([write], start, lambda: not builder.is_alive(), interval=5 * INTERVAL_S)
            write_samples.extend(samples)
            write_failures.extend(failures)

        writer_thread, writer_errors = _in_background(writer)
        samples, failures = _paced([query], start, lambda: not builder.is_alive())
        builder.join()
        build_s = time.monotonic() - start
        writer_thread.join()
        assert not (errors or writer_errors or failures or write_failures), \
            (errors, writer_errors, failures[:3], write_failures[:3])
        queries = [end - due for _, due, end in samples]
        writes = [end - due for _, due, end in write_samples]
        print(f"build {build_s:.1f} s; queries {_summary(queries)}; writes {_summary(writes)}")
        assert build_s >= MIN_BUILD_S, f"the build took {build_s:.1f} s: too short to show a stall"
        assert np.percentile(queries, 99) <= P99_BOUND_S and max(queries) <= MAX_BOUND_S, _summary(queries)
        # Writes wait only while the shard is copied and for the swap's tail, not for the build.
        assert max(writes) <= MAX_BOUND_S, _summary(writes)
        # Every write made during the build is in the new generation.
        assert store.count("c", None) == N + n_written[0]
        during = [point_id("during", f"p{i}.jpg") for i in range(n_written[0])]
        assert len(store.retrieve("c", during, with_vector=False)) == n_written[0]
    finally:
        store.close()


def test_health_and_search_answer_over_grpc_during_an_index_build(tmp_path: Path) -> None:
    built = threading.Event()
    builds: list[tuple[float, float]] = []  # (when it ended, time.monotonic(); how long it took, s)

    def on_built(_name: str, seconds: float) -> None:
        builds.append((time.monotonic(), seconds))
        built.set()

    store = EdgeStore(tmp_path, PARAMS, index_idle_seconds=0.3, on_index_built=on_built)
    running, core = create_search_server(SearchSettings(port=0, metrics_port=-1), store)
    try:
        with channel(f"127.0.0.1:{running.port}") as chan:
            wait_serving(chan, timeout=30)
            health = health_pb2_grpc.HealthStub(chan)
            search = search_pb2_grpc.SearchServiceStub(chan)
            query = search_pb2.SearchRequest(collection="c", vector=[1.0] * DIM, limit=10)
            _fill(store, "c")  # the indexer starts building once writes have paused for 0.3 s
            start = time.monotonic()
            samples, failures = _paced(
                [lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=60),
                 lambda: search.Search(query, timeout=60)],
                start, lambda: built.wait(0) or time.monotonic() - start > 120)
        assert built.is_set(), "no index build within 120 s"
        end, build_s = builds[0]
        window = [answered - due for _, due, answered in samples if due < end and answered > end - build_s]
        print(f"build {build_s:.1f} s; health + search during it: {_summary(window)}")
        assert not failures, failures[:3]
        assert build_s >= MIN_BUILD_S, f"the build took {build_s:.1f} s: too short to show a stall"
        assert np.percentile(window, 99) <= P99_BOUND_S and max(window) <= MAX_BOUND_S, _summary(window)
        assert core.get_collection("c").status == IndexStatus.GREEN
    finally:
        running.stop(0)
        core.close()


def test_status_is_yellow_while_a_build_runs_and_green_after_the_swap(tmp_path: Path) -> None:
    seen: dict[str, IndexStatus] = {}
    store: EdgeStore | None = None

    def hook(step: str) -> None:
        assert store is not None
        seen[step] = store.stats("c").status

    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None, build_hook=hook)
    try:
        _fill(store, "c", n=1000, dim=16)
        store.optimize("c")
        assert seen["copied"] == seen["built"] == seen["replayed"] == IndexStatus.YELLOW
        assert store.stats("c").status == IndexStatus.GREEN
        assert store.last_build is not None and store.last_build.optimized
        assert store._collections["c"].shard.info().indexed_vectors_count == 1000  # HNSW over every point
    finally:
        store.close()


def test_after_a_restart_writes_are_acknowledged_while_the_rebuild_runs(tmp_path: Path) -> None:
    # Issue 9, defect 12: after a SIGKILL the restarted service rebuilt its index for 24 s and
    # acknowledged no upsert for 11 s. Here the rebuild that a restart starts on its own cannot finish
    # until a write made during it was acknowledged: a write that waited for the build would deadlock
    # it, and the hook's wait would fail. (Surviving the kill itself: test_edge_build_crash.py.)
    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None)
    _fill(store, "c", n=2000, dim=16)
    store.close()
    building, acknowledged = threading.Event(), threading.Event()
    waited: list[bool] = []  # per build that reached "built": was a write acknowledged meanwhile?

    def hook(step: str) -> None:
        if step == "spawned":
            building.set()
        if step == "built":
            waited.append(acknowledged.wait(30))

    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=0.05, build_hook=hook)
    try:
        assert building.wait(60), "the restarted store did not rebuild the index"
        extra = _points(1, 16, seed=5, dataset="during")
        store.upsert("c", extra)  # acknowledged (returned) while the rebuild is still running
        acknowledged.set()
        deadline = time.monotonic() + 60
        while store.stats("c").status != IndexStatus.GREEN and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.stats("c").status == IndexStatus.GREEN and store.count("c", None) == 2001
        assert waited[0], "no write was acknowledged while the index was rebuilt"
    finally:
        store.close()


def test_the_build_process_shares_the_service_session_not_its_process_group(tmp_path: Path) -> None:
    # In a session of its own, Linux's autogroup gave the build a full group's CPU share whatever its
    # nice value; its own process group keeps a terminal's Ctrl-C from reaching it first.
    seen: list[tuple[int, int]] = []
    store: EdgeStore | None = None

    def hook(step: str) -> None:
        assert store is not None
        build = store._collections["c"].build
        if step == "spawned" and build is not None and build.process is not None:
            seen.append((os.getpgid(build.process.pid), os.getsid(build.process.pid)))
            assert build.process.pid == seen[-1][0]

    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None, build_hook=hook)
    try:
        _fill(store, "c", n=1000, dim=16)
        store.optimize("c")
        assert len(seen) == 1 and seen[0][0] != os.getpgid(0) and seen[0][1] == os.getsid(0)
    finally:
        store.close()


def test_old_layout_opens_and_builds_move_it_to_generations(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None)
    _fill(store, "c", n=1000, dim=16)
    store.close()
    collection_dir = tmp_path / "collections" / "c"
    # The layout written before builds moved out of the process: shard/ and no current.json.
    assert sorted(p.name for p in collection_dir.iterdir()) == ["collection.json", "shard"]
    (collection_dir / "shard-7").mkdir()  # a copy left by a build that a crash interrupted
    (collection_dir / ".current.json.0123.tmp").write_text("{")

    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None)
    try:
        assert sorted(p.name for p in collection_dir.iterdir()) == ["collection.json", "shard"]
        assert store.count("c", None) == 1000
        store.optimize("c")
        assert sorted(p.name for p in collection_dir.iterdir()) == ["collection.json", "current.json", "shard-1"]
        store.upsert("c", _points(10, 16, seed=5, dataset="more"))
        store.optimize("c")
        assert sorted(p.name for p in collection_dir.iterdir()) in (
            ["collection.json", "current.json", "shard-1"], ["collection.json", "current.json", "shard-2"])
    finally:
        store.close()
    reopened = EdgeStore(tmp_path, index_idle_seconds=None)
    try:
        assert reopened.count("c", None) == 1010
    finally:
        reopened.close()


def test_too_many_writes_during_a_build_abandon_it_and_the_collection_stays_pending(tmp_path: Path) -> None:
    store: EdgeStore | None = None
    extra = _points(300, 16, seed=3, dataset="extra")

    def hook(step: str) -> None:
        if step == "copied" and store is not None and extra:
            for i in range(0, 300, 100):  # writes go on during the build; the third exceeds the bound
                store.upsert("c", extra[i:i + 100])

    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None,
                      max_build_delta_points=250, build_hook=hook)
    try:
        _fill(store, "c", n=1000, dim=16)
        with pytest.raises(Unavailable, match="more than 250 points were written during the build"):
            store.optimize("c")
        collection_dir = tmp_path / "collections" / "c"
        assert sorted(p.name for p in collection_dir.iterdir()) == ["collection.json", "shard"]
        assert store.stats("c").status == IndexStatus.YELLOW
        assert store.count("c", None) == 1300
        extra.clear()
        store.optimize("c")  # writes have paused: this one lands
        assert store.stats("c").status == IndexStatus.GREEN and store.count("c", None) == 1300
    finally:
        store.close()


@pytest.mark.parametrize("how", ["delete", "close"])
def test_deleting_the_collection_or_closing_the_store_abandons_a_build(tmp_path: Path, how: str) -> None:
    store: EdgeStore | None = None
    finished: list[float] = []
    copied = threading.Event()

    def hook(step: str) -> None:
        if step == "spawned":
            copied.set()
            time.sleep(0.5)  # let the other thread act while the child runs

    store = EdgeStore(tmp_path, PARAMS, index_idle_seconds=None, build_hook=hook)
    _fill(store, "c")
    builder, errors = _in_background(lambda: store.optimize("c") if store is not None else None)
    assert copied.wait(30)
    start = time.monotonic()
    if how == "delete":
        assert store.delete_collection("c")
    else:
        store.close()
    finished.append(time.monotonic() - start)
    builder.join(30)
    assert finished[0] < 5.0, f"{how} waited {finished[0]:.1f} s for the build"
    assert len(errors) == 1 and isinstance(errors[0], NotFound if how == "delete" else Unavailable), errors
    if how == "delete":
        assert list((tmp_path / "collections").iterdir()) == []
        store.close()
    else:
        assert sorted(p.name for p in (tmp_path / "collections" / "c").iterdir()) == ["collection.json", "shard"]
        reopened = EdgeStore(tmp_path, index_idle_seconds=None)
        assert reopened.count("c", None) == N
        reopened.close()


def test_a_failed_build_turns_the_status_red_and_queries_go_on(tmp_path: Path) -> None:
    corrupt = [True]

    def hook(step: str) -> None:
        if step == "copied" and corrupt[0]:  # the child cannot load this copy
            (tmp_path / "collections" / "c" / "shard-1" / "edge_config.json").write_text("{")

    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None, build_hook=hook)
    try:
        _fill(store, "c", n=1000, dim=16)
        with pytest.raises(Internal, match="index build process exited with status 1"):
            store.optimize("c")
        assert store.stats("c").status == IndexStatus.RED
        assert len(store.query("c", [Query(np.ones(16, np.float32), 5)])[0]) == 5
        assert sorted(p.name for p in (tmp_path / "collections" / "c").iterdir()) == ["collection.json", "shard"]
        corrupt[0] = False
        store.optimize("c")  # a retry (the next write, or optimize) builds again
        assert store.stats("c").status == IndexStatus.GREEN
    finally:
        store.close()


def test_a_call_on_a_swapped_out_shard_retries_on_the_new_one(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, IndexParams(indexing_threshold_kb=20), index_idle_seconds=None)
    try:
        _fill(store, "c", n=1000, dim=16)
        collection = store._collections["c"]
        used: list[object] = []

        def count_after_a_swap(shard: qe.EdgeShard) -> int:
            used.append(shard)
            if len(used) == 1:
                store.optimize("c")  # between the call's read of the shard and its use: closes it
            return int(shard.info().points_count)

        assert store._call(collection, count_after_a_swap) == 1000
        assert len(used) == 2 and used[0] is not used[1] and used[1] is collection.shard
    finally:
        store.close()
