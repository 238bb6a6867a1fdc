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
   directory (Search and SearchBatch RPCs; then ingest of the same points through Upsert streams);
4. qdrant-client local mode through the same core (brute force in Python/numpy).

Latency is per single query (p50/p99 over ``--queries``); q/s single = 1 / mean latency; q/s batch
from batches of ``--batch``; recall@10 = |top-10 ∩ exact top-10| / 10, averaged over queries.
The last line is ``RESULT recall_at_10=<r> p50_ms_inprocess=<x> grpc_overhead_p50_ms=<y>
ingest_points_s=<z>`` (Edge in-process recall, p50 and ingest; service p50 minus in-process p50).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def through_service(data_dir: Path, catalogue: np.ndarray, classes: np.ndarray, queries: np.ndarray,
                    truth: list[list[str]], args: argparse.Namespace) -> Row:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # No index build during the measurements: the second collection below is only for ingest.
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "search", "serve", "--data-dir", str(data_dir),
                               "--port", str(port), "--metrics-port", "-1", "--hnsw-ef", str(args.ef),
                               "--index-idle-seconds", "3600", "--log-level", "WARNING"], cwd=ROOT, env=env)
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
        server.terminate()
        server.wait(120)
    return row


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
    args = parser.parse_args()

    log(f"data: {args.n:,} x {args.dim}-d vectors in {args.classes} classes, {args.queries} held-out queries")
    catalogue, classes, queries = make_data(args)
    ids = [point_id("synthetic", f"c{c}/{i}.jpg") for i, c in enumerate(classes)]
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    rows: list[Row] = []
    try:
        log("1/4 exact numpy top-10 (ground truth)")
        exact, truth = exact_numpy(catalogue, queries, ids, args)
        rows.append(exact)
        log("2/4 Edge in-process")
        edge, edge_exact, build = edge_in_process(work / "edge", catalogue, classes, queries, truth, args)
        rows += [edge, edge_exact]
        log("3/4 gRPC service on the same data directory")
        grpc_row = through_service(work / "edge", catalogue, classes, queries, truth, args)
        rows.append(grpc_row)
        log("4/4 qdrant-client local mode")
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
    print(f"\ntargets: recall@10 >= 0.99 ({edge.recall:.4f}), p50 <= 5 ms in-process ({edge.p50_ms:.3f} ms), "
          f"gRPC adds <= 1.5 ms p50 ({overhead:.3f} ms)")
    print(f"RESULT recall_at_10={edge.recall:.4f} p50_ms_inprocess={edge.p50_ms:.3f} "
          f"grpc_overhead_p50_ms={overhead:.3f} ingest_points_s={edge.ingest_s:.0f}")


if __name__ == "__main__":
    main()
