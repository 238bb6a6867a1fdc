"""Crash safety: after SIGKILL mid-stream, a restarted service on the same directory has every acknowledged point."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from retrieval.v1 import search_pb2, search_pb2_grpc

from services.common.clients import channel, point_message, wait_serving
from services.search.store import point_id
from tests.conftest import REPO
from tests.search.conftest import clustered
from tests.search.crash_writer import BATCH, batch_points

DIM = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(data_dir: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(data_dir.parent / f"server-{port}.log", "ab")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-m", "services.cli", "search", "serve", "--data-dir", str(data_dir),
                             "--port", str(port), "--metrics-port", "-1", *flags],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _all_ids(stub: search_pb2_grpc.SearchServiceStub, collection: str) -> set[str]:
    ids: set[str] = set()
    offset = ""
    while True:
        page = stub.Scroll(search_pb2.ScrollRequest(collection=collection, limit=1000, offset=offset))
        ids.update(p.id for p in page.points)
        if not page.next_offset:
            return ids
        offset = page.next_offset


def _batch(batch: int) -> list[search_pb2.Point]:
    vectors, labels = clustered(BATCH, DIM, seed=1000 + batch)
    return [point_message(v, f"s{batch}", f"c{c}/{i}.jpg", [f"c{c}"]) for i, (v, c) in
            enumerate(zip(vectors, labels, strict=True))]


def _stream(points: list[search_pb2.Point], pause: tuple[threading.Event, threading.Event] | None = None,
            ) -> Iterator[search_pb2.UpsertRequest]:
    """Two messages of 25 points each; with ``pause`` (acknowledged, resume) it waits between them."""
    yield search_pb2.UpsertRequest(collection="crash", points=points[:25])
    if pause is not None:
        acknowledged, resume = pause
        acknowledged.wait(30)
        resume.wait(30)
    yield search_pb2.UpsertRequest(points=points[25:])


@pytest.mark.parametrize("sync", [True, False], ids=["fsync", "wal-only"])
def test_service_killed_mid_stream_keeps_every_acknowledged_point(tmp_path: Path, sync: bool) -> None:
    data_dir = tmp_path / "data"
    port = _free_port()
    flags = [] if sync else ["--no-sync-writes"]
    server = _serve(data_dir, port, *flags)
    acked: list[str] = []
    sent, killed = threading.Event(), threading.Event()
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=60)
            stub = search_pb2_grpc.SearchServiceStub(chan)
            stub.CreateCollection(search_pb2.CreateCollectionRequest(name="crash", dim=DIM))

            def write() -> None:
                for batch in range(41):
                    # Streams back to back; the last one stops after its first message until the kill.
                    points = _batch(batch)
                    first_acked = threading.Event()
                    stream = stub.Upsert(_stream(points, (first_acked, killed) if batch == 40 else None), timeout=60)
                    try:
                        for ack in stream:  # one per message: its points are durable
                            acked.extend(point_id(f"s{batch}", p.payload.path)
                                         for p in points[25 * ack.sequence: 25 * (ack.sequence + 1)])
                            if batch == 40:
                                first_acked.set()
                                sent.set()
                    except grpc.RpcError:
                        return  # the server is gone: what it acknowledged is in ``acked``

            writer = threading.Thread(target=write)
            writer.start()
            assert sent.wait(120), "the writer did not reach its last stream"
            server.send_signal(signal.SIGKILL)
            server.wait(30)
            killed.set()
            writer.join(60)
    finally:
        killed.set()
        if server.poll() is None:
            server.kill()
            server.wait()
    assert len(acked) == 40 * BATCH + 25  # the cut stream's first message was acknowledged too

    restarted = _serve(data_dir, port, *flags)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=60)
            stub = search_pb2_grpc.SearchServiceStub(chan)
            present = _all_ids(stub, "crash")
            count = stub.Count(search_pb2.CountRequest(collection="crash")).count
            missing = set(acked) - present
            assert not missing, f"{len(missing)} of {len(acked)} acknowledged points are missing"
            # Nothing that was not sent may appear.
            assert len(acked) == count == len(present)
            # The vectors are intact, not only the ids.
            vectors, labels = clustered(BATCH, DIM, seed=1000 + 3)
            hit = stub.Search(search_pb2.SearchRequest(collection="crash", vector=vectors[7].tolist(), limit=1,
                                                       exact=True)).hits[0]
            assert hit.id == point_id("s3", f"c{labels[7]}/7.jpg") and hit.score == pytest.approx(1.0, abs=1e-5)
            print(f"acknowledged {len(acked)}, present after restart {count}")
    finally:
        restarted.terminate()
        assert restarted.wait(30) == 0


def test_writer_process_killed_mid_stream_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    writer = subprocess.Popen([sys.executable, "-m", "tests.search.crash_writer", str(data_dir)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) == 60:
                writer.send_signal(signal.SIGKILL)  # while it writes batch 60
                break
        writer.wait(30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert acked == list(range(60))

    port = _free_port()
    server = _serve(data_dir, port)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=60)
            stub = search_pb2_grpc.SearchServiceStub(chan)
            present = _all_ids(stub, "crash")
            expected = {point_id(p.payload.dataset, p.payload.path) for b in acked for p in batch_points(b)}
            assert not expected - present, f"{len(expected - present)} acknowledged points are missing"
            count = stub.Count(search_pb2.CountRequest(collection="crash")).count
            assert len(expected) <= count <= len(expected) + 2 * BATCH
            sample = batch_points(59)[0]
            hit = stub.Search(search_pb2.SearchRequest(collection="crash", vector=sample.vector.tolist(), limit=1,
                                                       exact=True)).hits[0]
            assert hit.id == point_id(sample.payload.dataset, sample.payload.path)
            assert hit.score == pytest.approx(1.0, abs=1e-5)
    finally:
        server.terminate()
        assert server.wait(30) == 0
