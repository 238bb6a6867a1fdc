"""Edge search service restarted after a SIGKILL mid-ingest: time to open, and writes during the rebuild.

1. ``retrieval search serve --no-sync-writes`` (an Upsert is acknowledged once in the write-ahead
   log; nothing is flushed or fsynced) takes ``--n`` x ``--dim`` points in Upsert streams of
   ``--ingest-batch``; then one more stream sends its first message and the service is SIGKILLed
   while it waits for the rest. Its log and segments are as a crash mid-ingest leaves them.
2. The service restarts on the directory with the default settings (fsync per stream; the index
   build starts after ``--index-idle-seconds``): time from start to SERVING, and the service's own
   ``loaded collection ... in X s`` (``EdgeShard.load`` replaying the log, before the server listens).
   Every acknowledged point must be there.
3. While the collection's index is rebuilt (its first build, ``--n`` x ``--dim``), this process
   Upserts 64 points into that same collection every ``--upsert-interval`` s (each acknowledged after
   fsync; recorded and replayed onto the new index) and calls health Check and Search alternately
   every ``--probe-interval`` s, all timed from when each call was due (``search.paced``), until the
   service logs the build's end. (Edge's flush, and so each synced Upsert, holds the GIL while it
   fsyncs, build or not: the probes see those waits as well.)

The last line is ``RESULT serving_after_restart_s=<s> load_s=<l> rebuild_s=<b> upsert_p99_ms=<u>
probe_p99_ms=<p> lost_points=<0>``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from retrieval.v1 import search_pb2, search_pb2_grpc  # noqa: E402
from search import BuildRun, free_port, log, make_data, paced, percentile_ms, read_build_log, serve  # noqa: E402

from services.common.clients import channel, upsert_messages, wait_serving  # noqa: E402
from services.search.store import point_id  # noqa: E402

COLLECTION = "bench__ingest"  # the name search.read_build_log looks for
# The service's log line for the end of the rebuild, whichever way it ended.
BUILD_ENDED = re.compile(rf"index build of {COLLECTION} .*(s in all;|abandoned|failed)")


def ingest_and_kill(data_dir: Path, vectors: np.ndarray, args: argparse.Namespace) -> tuple[int, float]:
    """Step 1: acknowledged points and ingest seconds; the service is SIGKILLed mid-stream afterwards."""
    port = free_port()
    server = serve(data_dir, port, args, "--no-sync-writes", "--index-idle-seconds", "3600", "--log-level", "WARNING")
    messages = [search_pb2.Point(vector=v.tolist(), payload=search_pb2.Payload(dataset="restart", path=f"{i}.jpg"))
                for i, v in enumerate(vectors)]
    acked = 0
    sent, killed = threading.Event(), threading.Event()
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=120)
            stub = search_pb2_grpc.SearchServiceStub(chan)
            stub.CreateCollection(search_pb2.CreateCollectionRequest(name=COLLECTION, dim=args.dim))
            start = time.perf_counter()
            for i in range(0, args.n, args.ingest_batch):
                acked += sum(a.upserted for a in stub.Upsert(upsert_messages(
                    COLLECTION, messages[i:i + args.ingest_batch], max_points=args.ingest_batch)))
                if (i // args.ingest_batch) % max(1, args.n // args.ingest_batch // 5) == 0:
                    log(f"  ingest without fsync: {acked}/{args.n}")
            seconds = time.perf_counter() - start

            def cut_stream() -> Iterator[search_pb2.UpsertRequest]:
                extra = np.random.default_rng(args.seed + 7).standard_normal((2, 64, args.dim))
                for part, block in enumerate(extra):
                    yield search_pb2.UpsertRequest(collection=COLLECTION, points=[search_pb2.Point(
                        vector=v.tolist(), payload=search_pb2.Payload(dataset="cut", path=f"{part}-{j}.jpg"))
                        for j, v in enumerate(block)])
                    sent.set()
                    killed.wait(60)

            def cut() -> None:
                with contextlib.suppress(grpc.RpcError):  # the server dies under it: what it acknowledged
                    list(stub.Upsert(cut_stream(), timeout=60))  # before (the first message) stays

            writer = threading.Thread(target=cut)
            writer.start()
            sent.wait(60)
            time.sleep(0.3)  # the server takes the first message
            server.send_signal(signal.SIGKILL)
            server.wait(60)
            killed.set()
            writer.join(60)
    finally:
        killed.set()
        if server.poll() is None:
            server.kill()
            server.wait()
    return acked, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="points ingested before the SIGKILL")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--ingest-batch", type=int, default=1024, help="points per Upsert stream")
    parser.add_argument("--index-idle-seconds", type=float, default=2.0, help="the restarted service's setting")
    parser.add_argument("--upsert-interval", type=float, default=0.5, help="s between Upserts during the rebuild")
    parser.add_argument("--probe-interval", type=float, default=0.05, help="s between health/Search calls")
    parser.add_argument("--ef", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-timeout", type=float, default=900)
    args = parser.parse_args()
    args.queries = 1
    vectors, _, query = make_data(args)
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    data_dir = work / "edge"
    try:
        log(f"1/3 ingest {args.n:,} x {args.dim}-d without fsync, then SIGKILL mid-stream")
        acked, ingest_s = ingest_and_kill(data_dir, vectors, args)
        wal = sum(f.stat().st_size for f in data_dir.rglob("wal/*") if f.is_file())
        log(f"  {acked:,} points acknowledged ({acked / ingest_s:,.0f} points/s); write-ahead log "
            f"{wal / 2**20:.0f} MiB")

        log("2/3 restart")
        port = free_port()
        log_file = work / "serve.log"
        start = time.monotonic()
        server = serve(data_dir, port, args, "--index-idle-seconds", str(args.index_idle_seconds),
                       "--log-level", "INFO", log_file=log_file)
        run = BuildRun()
        upserts: list[tuple[float, float]] = []
        stop = threading.Event()
        try:
            with channel(f"127.0.0.1:{port}") as chan:
                wait_serving(chan, timeout=600)
                run.restart_s = time.monotonic() - start
                stub = search_pb2_grpc.SearchServiceStub(chan)
                health = health_pb2_grpc.HealthStub(chan)
                count = stub.Count(search_pb2.CountRequest(collection=COLLECTION)).count
                present: set[str] = set()
                offset = ""
                while True:  # every acknowledged id, page by page
                    page = stub.Scroll(search_pb2.ScrollRequest(collection=COLLECTION, limit=5000, offset=offset))
                    present.update(p.id for p in page.points)
                    if not page.next_offset:
                        break
                    offset = page.next_offset
                lost = len({point_id("restart", f"{i}.jpg") for i in range(acked)} - present)
                log(f"  SERVING {run.restart_s:.1f} s after the restart; {count:,} points, {lost} acknowledged lost")

                log("3/3 upserts and health/Search while the index is rebuilt")
                while " started" not in log_file.read_text(errors="replace"):
                    if time.monotonic() - start > 120:
                        raise TimeoutError("the rebuild did not start within 120 s")
                    time.sleep(0.05)
                rng = np.random.default_rng(args.seed + 1)
                sent = [0]

                def upsert() -> None:
                    block = rng.standard_normal((64, args.dim))
                    list(stub.Upsert(iter([search_pb2.UpsertRequest(collection=COLLECTION, points=[search_pb2.Point(
                        vector=v.tolist(), payload=search_pb2.Payload(dataset="after", path=f"{sent[0] + j}.jpg"))
                        for j, v in enumerate(block)])]), timeout=60))
                    sent[0] += len(block)

                search = search_pb2.SearchRequest(collection=COLLECTION, vector=query[0].tolist(), limit=10)
                threads = [threading.Thread(target=paced, args=([upsert], args.upsert_interval, stop, upserts,
                                                                run.failures)),
                           threading.Thread(target=paced, args=(
                               [lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=60),
                                lambda: stub.Search(search, timeout=60)], args.probe_interval, stop, run.probes,
                               run.failures))]
                for thread in threads:
                    thread.start()
                last = time.monotonic()
                while not BUILD_ENDED.search(log_file.read_text(errors="replace")):
                    if time.monotonic() - start > args.build_timeout:
                        raise TimeoutError(f"the rebuild did not end within {args.build_timeout} s")
                    if time.monotonic() - last >= 10:
                        last = time.monotonic()
                        log(f"  rebuilding: {len(upserts)} upserts, p99 so far "
                            f"{percentile_ms([s for _, s in upserts], 99):.1f} ms")
                    time.sleep(0.25)
                stop.set()
                for thread in threads:
                    thread.join()
                final = stub.Count(search_pb2.CountRequest(collection=COLLECTION)).count
        finally:
            stop.set()
            server.terminate()
            server.wait(120)
        read_build_log(log_file, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load_s = float("nan")
    for line in run.server_lines:
        print(f"  service: {line}")
        if "loaded collection" in line:
            load_s = float(line.rsplit(" in ", 1)[1].split()[0])
    writes = run.during(upserts)
    probes = run.during(run.probes)
    rebuild_s = run.build_end - run.build_start if run.build_end else float("nan")
    print(f"\n{acked:,} x {args.dim}-d acknowledged without fsync, SIGKILL mid-stream: restart to SERVING "
          f"{run.restart_s:.1f} s (EdgeShard.load {load_s:.2f} s of it), {lost} acknowledged points lost; "
          f"{count:,} points after the restart, {final:,} at the end ({sent[0]:,} upserted during the rebuild)")
    print(f"rebuild {rebuild_s:.1f} s; during it {len(writes)} Upserts of 64 points (fsync each) into the collection "
          f"being rebuilt: p50 {percentile_ms(writes, 50):.1f} ms, p99 {percentile_ms(writes, 99):.1f} ms, "
          f"max {percentile_ms(writes, 100):.0f} ms; {len(probes)} health/Search calls: "
          f"p50 {percentile_ms(probes, 50):.1f} ms, p99 {percentile_ms(probes, 99):.1f} ms, "
          f"max {percentile_ms(probes, 100):.0f} ms; {len(run.failures)} failed calls")
    for failure in run.failures[:5]:
        print(f"  failed: {failure}")
    print(f"RESULT serving_after_restart_s={run.restart_s:.1f} load_s={load_s:.2f} rebuild_s={rebuild_s:.1f} "
          f"upsert_p99_ms={percentile_ms(writes, 99):.1f} probe_p99_ms={percentile_ms(probes, 99):.1f} "
          f"lost_points={lost}")


if __name__ == "__main__":
    main()
