"""Search latency, throughput, recall and ingest, side by side in one run on the same vectors.

Data: ``--n`` (100k) unit vectors with class structure, like encoder outputs and unlike isotropic
noise: ``--classes`` class centres in a ``--latent``-d space, points scattered around them with a
per-class spread, mapped linearly to ``--dim`` dimensions with a little isotropic noise. Queries are
held-out points of the same distribution.

1. exact: numpy brute force (the ground truth top-10);
2. Edge HNSW in-process: the search core on the Qdrant Edge store (ingest through the core in
   messages of ``--ingest-batch`` points, each acknowledged after fsync, as the service does), then
   the index build, single and batched queries, and exact (brute-force) search through Edge;
3. the same through the gRPC service: ``retrieval search serve`` as its own process on the same data
   directory (Search and SearchBatch RPCs; then ingest of the same points through Upsert streams
   into a second collection, after which the service is killed with SIGKILL);
4. the service restarted on that directory builds the second collection's index (its first build:
   ``--n`` x ``--dim``) while this process, a separate client, calls health Check and Search (on the
   collection being built) alternately, one due every ``--probe-interval`` s. Each call is timed
   from when it was due, so a stalled service counts fully (no coordinated omission). The build's
   start and end come from the service's log; the same calls before it are the comparison. (No
   writes here: a synced Upsert holds the GIL for its fsync whether or not a build runs; writes
   during a rebuild are ``benchmarks/search_restart.py``'s subject);
5. qdrant-client local mode through the same core (brute force in Python/numpy).

Latency is per single query (p50/p99 over ``--queries``); q/s single = 1 / mean latency; q/s batch
from batches of ``--batch``; recall@10 = |top-10 ∩ exact top-10| / 10, averaged over queries.
The last line is ``RESULT recall_at_10=<r> p50_ms_inprocess=<x> grpc_overhead_p50_ms=<y>
ingest_points_s=<z> build_p99_ms=<b>`` (Edge in-process recall, p50 and ingest; service p50 minus
in-process p50; p99 of health and Search latency during the index build of step 4).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from retrieval.v1 import search_pb2, search_pb2_grpc  # noqa: E402

from services.common.clients import (  # noqa: E402
    channel,
    upsert_messages,
    wait_serving,
)
from services.search.config import SearchSettings  # noqa: E402
from services.search.core import SearchCore  # noqa: E402
from services.search.edge_store import EdgeStore  # noqa: E402
from services.search.qdrant_store import QdrantStore  # noqa: E402
from services.search.store import Hit, IndexParams, Payload, Point, Query, point_id  # noqa: E402

COLLECTION = "bench__synthetic"
K = 10


@dataclass
class Row:
    """One method's measurements (None: not measured for that method)."""

    name: str
    ingest_s: float | None = None
    latencies: list[float] = field(default_factory=list)
    batch_qps: float | None = None
    recall: float | None = None

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies, 50) * 1000)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99) * 1000)

    @property
    def single_qps(self) -> float:
        return float(1.0 / np.mean(self.latencies))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalogue vectors, their classes, query vectors): unit float32 vectors with class structure."""
    rng = np.random.default_rng(args.seed)
    total = args.n + args.queries
    centres = rng.standard_normal((args.classes, args.latent)).astype(np.float32)
    spread = rng.uniform(0.4, 0.9, args.classes).astype(np.float32)
    classes = rng.integers(0, args.classes, total)
    latent = centres[classes] + spread[classes, None] * rng.standard_normal((total, args.latent)).astype(np.float32)
    projection = rng.standard_normal((args.latent, args.dim)).astype(np.float32) / np.sqrt(args.latent)
    x = latent @ projection + 0.05 * rng.standard_normal((total, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:args.n], classes[:args.n], x[args.n:]


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def time_each(queries: np.ndarray, run: Callable[[np.ndarray], list[str]], warmup: int = 50,
              label: str = "") -> tuple[list[float], list[list[str]]]:
    """Latency of ``run`` per query (after ``warmup`` untimed calls) and its answers."""
    for q in queries[:warmup]:
        run(q)
    latencies, answers = [], []
    for i, q in enumerate(queries):
        start = time.perf_counter()
        answers.append(run(q))
        latencies.append(time.perf_counter() - start)
        if label and (i + 1) % max(1, len(queries) // 4) == 0:
            log(f"  {label}: {i + 1}/{len(queries)} queries")
    return latencies, answers


def time_batches(queries: np.ndarray, batch: int, run: Callable[[np.ndarray], object]) -> float:
    """Queries/s answering ``queries`` in batches of ``batch`` (one warm-up batch untimed)."""
    run(queries[:batch])
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        run(queries[i:i + batch])
    return len(queries) / (time.perf_counter() - start)


def points(vectors: np.ndarray, classes: np.ndarray) -> Iterator[Point]:
    for i, (v, c) in enumerate(zip(vectors, classes, strict=True)):
        yield Point("", v, Payload("synthetic", f"c{c}/{i}.jpg", (f"c{c}",)))


def ingest(core: SearchCore, vectors: np.ndarray, classes: np.ndarray, batch: int, label: str) -> float:
    """Points/s upserting through the core in acknowledged batches of ``batch``."""
    all_points = list(points(vectors, classes))
    start = time.perf_counter()
    for i in range(0, len(all_points), batch):
        core.upsert(COLLECTION, all_points[i:i + batch])
        if (i // batch) % max(1, len(all_points) // batch // 5) == 0:
            log(f"  {label} ingest: {i + batch}/{len(all_points)}")
    return len(all_points) / (time.perf_counter() - start)


def ids_of(hits: list[Hit]) -> list[str]:
    return [h.id for h in hits]


def exact_numpy(catalogue: np.ndarray, queries: np.ndarray, ids: list[str], args: argparse.Namespace) -> tuple[
        Row, list[list[str]]]:
    def top(q: np.ndarray) -> list[str]:
        scores = catalogue @ q
        best = np.argpartition(-scores, K)[:K]
        return [ids[i] for i in best[np.argsort(-scores[best])]]

    row = Row("exact (numpy brute force)")
    row.latencies, truth = time_each(queries, top, label="numpy")
    row.batch_qps = time_batches(queries, args.batch,
                                 lambda qs: np.argpartition(-(qs @ catalogue.T), K, axis=1)[:, :K])
    row.recall = 1.0
    return row, truth


def search_fn(core: SearchCore, exact: bool = False) -> Callable[[np.ndarray], list[str]]:
    return lambda q: ids_of(core.search(COLLECTION, Query(q, K, exact=exact, with_payload=False)))


def edge_in_process(data_dir: Path, catalogue: np.ndarray, classes: np.ndarray, queries: np.ndarray,
                    truth: list[list[str]], args: argparse.Namespace) -> tuple[Row, Row, float]:
    store = EdgeStore(data_dir, IndexParams(m=args.m, ef_construct=args.ef_construct, ef=args.ef),
                      index_idle_seconds=None)
    core = SearchCore(SearchSettings(), store)
    try:
        core.create_collection(COLLECTION, args.dim, model="synthetic", dataset="synthetic")
        row = Row("Edge HNSW, in-process")
        row.ingest_s = ingest(core, catalogue, classes, args.ingest_batch, "edge")
        log(f"  edge ingest {row.ingest_s:,.0f} points/s; building the HNSW index...")
        start = time.perf_counter()
        store.optimize(COLLECTION)
        build = time.perf_counter() - start
        log(f"  index built in {build:.1f} s")
        row.latencies, found = time_each(queries, search_fn(core), label="edge")
        row.recall = recall(found, truth)
        row.batch_qps = time_batches(queries, args.batch, lambda qs: core.search_batch(
            [(COLLECTION, Query(q, K, with_payload=False)) for q in qs]))
        exact = Row("Edge exact (brute force), in-process")
        few = queries[:args.exact_queries]
        exact.latencies, found = time_each(few, search_fn(core, exact=True), warmup=5)
        exact.recall = recall(found, truth[:len(few)])
        return row, exact, build
    finally:
        core.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(data_dir: Path, port: int, args: argparse.Namespace, *flags: str, log_file: Path | None = None,
          ) -> subprocess.Popen[bytes]:
    """``retrieval search serve`` on ``data_dir`` as its own process (its log to ``log_file``, if given)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = open(log_file, "wb") if log_file is not None else None  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-m", "services.cli", "search", "serve", "--data-dir", str(data_dir),
                             "--port", str(port), "--metrics-port", "-1", "--hnsw-ef", str(args.ef), *flags],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)


def through_service(data_dir: Path, catalogue: np.ndarray, classes: np.ndarray, queries: np.ndarray,
                    truth: list[list[str]], args: argparse.Namespace) -> Row:
    port = free_port()
    # No index build during the measurements: the second collection below is only for ingest.
    server = serve(data_dir, port, args, "--index-idle-seconds", "3600", "--log-level", "WARNING")
    row = Row("Edge HNSW, through the gRPC service")
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=120)
            stub = search_pb2_grpc.SearchServiceStub(chan)

            def one(q: np.ndarray) -> list[str]:
                request = search_pb2.SearchRequest(collection=COLLECTION, vector=q.tolist(), limit=K)
                return [h.id for h in stub.Search(request).hits]

            row.latencies, found = time_each(queries, one, label="grpc")
            row.recall = recall(found, truth)
            row.batch_qps = time_batches(queries, args.batch, lambda qs: stub.SearchBatch(
                search_pb2.SearchBatchRequest(queries=[
                    search_pb2.SearchRequest(collection=COLLECTION, vector=q.tolist(), limit=K) for q in qs])))
            log("  ingest through Upsert streams into a second collection...")
            stub.CreateCollection(search_pb2.CreateCollectionRequest(name="bench__ingest", dim=args.dim))
            messages = [search_pb2.Point(vector=v.tolist(), payload=search_pb2.Payload(
                dataset="synthetic", path=f"c{c}/{i}.jpg", labels=[f"c{c}"]))
                for i, (v, c) in enumerate(zip(catalogue, classes, strict=True))]
            start = time.perf_counter()
            # One stream of --ingest-batch point messages, each acknowledged after its fsync, like the
            # in-process rows.
            acks = list(stub.Upsert(upsert_messages("bench__ingest", messages, max_points=args.ingest_batch)))
            assert sum(a.upserted for a in acks) == len(messages)
            row.ingest_s = len(messages) / (time.perf_counter() - start)
    finally:
        # As a crash or an OOM kill would: the restart below opens the directory after it.
        server.kill()
        server.wait(120)
    return row


@dataclass
class BuildRun:
    """Step 4: the index build through the restarted service, as a client sees it (times in s).

    ``probes`` holds (when the call was due, time.time(); its latency from then, s).
    The build's own start and end come from the service's log (``index build of ... started`` and
    ``... s in all``); the probes due in between are the ones ``during`` reports.
    """

    restart_s: float = 0.0
    green_s: float = 0.0  # SERVING to the collection's status GREEN
    build_start: float = 0.0  # time.time(), from the service's log; 0.0 if not found there
    build_end: float = 0.0
    probes: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    server_lines: list[str] = field(default_factory=list)  # the service's own log of the load and build

    def during(self, samples: list[tuple[float, float]]) -> list[float]:
        """Latencies of the calls that were due while the build ran (all of them if its times are unknown)."""
        if not self.build_end:
            return [latency for _, latency in samples]
        return [latency for due, latency in samples if self.build_start <= due <= self.build_end]

    def before(self, samples: list[tuple[float, float]]) -> list[float]:
        return [latency for due, latency in samples if due < self.build_start]


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q) * 1000) if latencies else float("nan")


def paced(calls: list[Callable[[], object]], interval: float, stop: threading.Event,
          out: list[tuple[float, float]], failures: list[str]) -> None:
    """Makes the calls in turn, one due every ``interval`` s, until ``stop`` and caught up.

    Appends (when the call was due, time.time(); its latency in s), the latency counted from when
    the call was due rather than from when it was sent: the calls that fell due while one was stuck
    are made (late) and counted, as a prober with a fixed schedule would see them.
    """
    due = time.monotonic()
    offset = time.time() - due  # monotonic -> wall clock, to match the service's log
    i = 0
    while not (stop.is_set() and due >= time.monotonic()):
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            calls[i % len(calls)]()
        except Exception as exc:  # reported, and the run goes on
            failures.append(f"{type(exc).__name__}: {exc}"[:200])
        out.append((due + offset, time.monotonic() - due))
        due += interval
        i += 1


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+ "
                       r"((?:loaded collection|index build of) bench__ingest .*)$", re.MULTILINE)


def read_build_log(log_file: Path, run: BuildRun) -> None:
    """Fills in the service's log lines about ``bench__ingest`` and the build's start and end times."""
    for match in _LOG_LINE.finditer(log_file.read_text(errors="replace")):
        when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
        line = match.group(3)
        run.server_lines.append(f"{match.group(1)},{match.group(2)} {line}")
        if line.endswith(" started") and not run.build_start:
            run.build_start = when
        elif " s in all;" in line and run.build_start and not run.build_end:
            run.build_end = when


def build_through_service(data_dir: Path, args: argparse.Namespace) -> BuildRun:
    """Restarts the service on ``data_dir`` and measures it while it builds ``bench__ingest``'s index."""
    run = BuildRun()
    port = free_port()
    log_file = data_dir.parent / "serve-build.log"
    start = time.monotonic()
    # The build starts once the collections opened at start have had no writes for 10 s: after
    # SERVING, so that the probes see the service before the build too (the "before" numbers).
    server = serve(data_dir, port, args, "--index-idle-seconds", "10", "--log-level", "INFO", log_file=log_file)
    stop = threading.Event()
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=300)
            serving = time.monotonic()
            run.restart_s = serving - start
            log(f"  restarted after SIGKILL: SERVING in {run.restart_s:.1f} s; probing before and while the index "
                "builds...")
            stub = search_pb2_grpc.SearchServiceStub(chan)
            health = health_pb2_grpc.HealthStub(chan)
            rng = np.random.default_rng(args.seed + 1)
            query = search_pb2.SearchRequest(collection="bench__ingest", limit=K,
                                             vector=rng.standard_normal(args.dim).tolist())
            probes = [lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=60),
                      lambda: stub.Search(query, timeout=60)]
            prober = threading.Thread(target=paced, args=(probes, args.probe_interval, stop, run.probes,
                                                          run.failures))
            prober.start()
            info = search_pb2.GetCollectionRequest(name="bench__ingest")
            last_report = serving
            while stub.GetCollection(info, timeout=60).collection.status != search_pb2.INDEX_STATUS_GREEN:
                if time.monotonic() - serving > args.build_timeout:
                    raise TimeoutError(f"bench__ingest not GREEN {args.build_timeout} s after the restart")
                if time.monotonic() - last_report >= 10:
                    last_report = time.monotonic()
                    done = [latency for _, latency in run.probes]
                    log(f"  {last_report - serving:.0f} s after SERVING: {len(done)} health/search calls, p99 so far "
                        f"{percentile_ms(done, 99):.1f} ms")
                time.sleep(0.5)
            run.green_s = time.monotonic() - serving
            stop.set()
            prober.join()
    finally:
        stop.set()
        server.terminate()
        server.wait(120)
    read_build_log(log_file, run)
    return run


def qdrant_local(catalogue: np.ndarray, classes: np.ndarray, queries: np.ndarray, truth: list[list[str]],
                 args: argparse.Namespace) -> Row:
    core = SearchCore(SearchSettings(), QdrantStore.local_mode())
    row = Row("qdrant-client local mode")
    try:
        core.create_collection(COLLECTION, args.dim)
        row.ingest_s = ingest(core, catalogue, classes, args.ingest_batch, "local")
        few = queries[:args.local_queries]
        row.latencies, found = time_each(few, search_fn(core), warmup=5, label="local")
        row.recall = recall(found, truth[:len(few)])
        row.batch_qps = time_batches(few, args.batch, lambda qs: core.search_batch(
            [(COLLECTION, Query(q, K, with_payload=False)) for q in qs]))
    finally:
        core.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="catalogue vectors")
    parser.add_argument("--dim", type=int, default=384, help="dimension (384: DINOv2 ViT-S/14)")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--latent", type=int, default=64, help="intrinsic dimension of the class structure")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=100, help="queries for Edge exact search")
    parser.add_argument("--local-queries", type=int, default=200, help="queries for local mode (brute force)")
    parser.add_argument("--batch", type=int, default=64, help="queries per batched call")
    parser.add_argument("--ingest-batch", type=int, default=1024, help="points per acknowledged upsert")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construct", type=int, default=128)
    parser.add_argument("--ef", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-interval", type=float, default=0.025,
                        help="step 4: s between health/Search calls due during the index build")
    parser.add_argument("--build-timeout", type=float, default=900, help="step 4: give up after this many s")
    args = parser.parse_args()

    log(f"data: {args.n:,} x {args.dim}-d vectors in {args.classes} classes, {args.queries} held-out queries")
    catalogue, classes, queries = make_data(args)
    ids = [point_id("synthetic", f"c{c}/{i}.jpg") for i, c in enumerate(classes)]
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    rows: list[Row] = []
    try:
        log("1/5 exact numpy top-10 (ground truth)")
        exact, truth = exact_numpy(catalogue, queries, ids, args)
        rows.append(exact)
        log("2/5 Edge in-process")
        edge, edge_exact, build = edge_in_process(work / "edge", catalogue, classes, queries, truth, args)
        rows += [edge, edge_exact]
        log("3/5 gRPC service on the same data directory")
        grpc_row = through_service(work / "edge", catalogue, classes, queries, truth, args)
        rows.append(grpc_row)
        log("4/5 the service restarted after SIGKILL, building the ingested collection's index")
        built = build_through_service(work / "edge", args)
        log("5/5 qdrant-client local mode")
        rows.append(qdrant_local(catalogue, classes, queries, truth, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.n:,} vectors, dim {args.dim}, k={K}, HNSW m={args.m} ef_construct={args.ef_construct} "
          f"ef={args.ef}; Edge index build {build:.1f} s; batch {args.batch}; {os.cpu_count()} CPUs")
    header = f"{'method':<40}{'ingest pts/s':>14}{'p50 ms':>9}{'p99 ms':>9}{'q/s single':>12}{'q/s batch':>11}" \
             f"{'recall@10':>11}{'queries':>9}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        ingest_text = f"{r.ingest_s:,.0f}" if r.ingest_s else "-"
        batch_text = f"{r.batch_qps:,.0f}" if r.batch_qps else "-"
        print(f"{r.name:<40}{ingest_text:>14}{r.p50_ms:>9.3f}{r.p99_ms:>9.3f}{r.single_qps:>12,.0f}"
              f"{batch_text:>11}{r.recall or 0:>11.4f}{len(r.latencies):>9}")
    overhead = grpc_row.p50_ms - edge.p50_ms
    during = built.during(built.probes)
    build_p99 = percentile_ms(during, 99)
    before = built.before(built.probes)
    window = (f"{built.build_end - built.build_start:.1f} s (the service's log: copy, child, swap)" if built.build_end
              else "unknown (no build lines in the service's log: every call counted)")
    print(f"\nindex build through the service after a SIGKILL: SERVING {built.restart_s:.1f} s after the restart; "
          f"{args.n:,} x {args.dim}-d index build {window}; SERVING to GREEN {built.green_s:.1f} s")
    print(f"  health Check + Search (on the collection being built), one due every "
          f"{args.probe_interval * 1000:.0f} ms, timed from when due: during the build {len(during)} calls, "
          f"p50 {percentile_ms(during, 50):.1f} ms, p99 {build_p99:.1f} ms, max {percentile_ms(during, 100):.0f} ms; "
          f"before it (same service, no build) {len(before)} calls, p50 {percentile_ms(before, 50):.1f} ms, "
          f"p99 {percentile_ms(before, 99):.1f} ms")
    if built.failures:
        print(f"  {len(built.failures)} failed calls")
    for line in built.server_lines:
        print(f"  service: {line}")
    for failure in built.failures[:5]:
        print(f"  failed: {failure}")
    print(f"\ntargets: recall@10 >= 0.99 ({edge.recall:.4f}), p50 <= 5 ms in-process ({edge.p50_ms:.3f} ms), "
          f"gRPC adds <= 1.5 ms p50 ({overhead:.3f} ms), health and search p99 <= 250 ms during an index build "
          f"({build_p99:.1f} ms)")
    print(f"RESULT recall_at_10={edge.recall:.4f} p50_ms_inprocess={edge.p50_ms:.3f} "
          f"grpc_overhead_p50_ms={overhead:.3f} ingest_points_s={edge.ingest_s:.0f} build_p99_ms={build_p99:.1f}")


if __name__ == "__main__":
    main()
