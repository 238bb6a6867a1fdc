"""Health checks of the search service while it answers large exact SearchBatch calls, side by side.

Qdrant Edge holds the GIL for the whole of a query call, so a SearchBatch that reached the engine as
one call stalled every other RPC of the service for its whole duration, health checks included. The
service now slices a batch so that each engine call scans at most ``--scan-components-per-call``
vector components (points x dim per query). This script starts the service twice as its own process,
once with a budget so large that every batch is one call (the old behaviour) and once with the
default, and in each:

- indexes ``--points`` clustered ``--dim``-d vectors (the size of the evaluator's Caltech-101 run:
  8,677 x 1280-d for EfficientNet-Lite0);
- sends exact SearchBatch calls of ``--batch`` queries (limit 101, the evaluator's depth) back to back
  from one thread, as the evaluator's query stage does, for ``--seconds``;
- probes grpc.health.v1 Check every 100 ms from another thread (latency counted from when the probe
  was due, as a prober on a fixed schedule sees it).

A third run does the same on an exact-only collection (as the evaluator creates), which the service
answers from its in-memory copy of the vectors as BLAS matrix products, on every core and without
the GIL (``services.search.exact_scan``).

Last line: ``RESULT health_p99_ms_sliced=<a> health_p99_ms_unsliced=<b> qps_sliced=<c> qps_unsliced=<d>
health_p99_ms_scan=<e> qps_scan=<f>`` (qps: exact queries answered per second by the batch thread).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from retrieval.v1 import search_pb2, search_pb2_grpc  # noqa: E402
from search import free_port, paced, percentile_ms  # noqa: E402

from services.common.clients import channel, upsert_messages, wait_serving  # noqa: E402
from services.search.edge_store import SCAN_COMPONENTS_PER_CALL  # noqa: E402

COLLECTION = "stall__bench"
DEPTH = 101


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(label: str, budget: int, vectors: np.ndarray, args: argparse.Namespace,
        exact_only: bool = False) -> tuple[float, float]:
    """Returns (health p99 in ms while batches ran, exact queries per second)."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="stall-"))
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "search", "serve", "--data-dir", str(data_dir),
                               "--port", str(port), "--metrics-port", "-1", "--log-level", "WARNING",
                               "--index-idle-seconds", "3600", "--scan-components-per-call", str(budget)],
                              cwd=ROOT)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=120)
            stub = search_pb2_grpc.SearchServiceStub(chan)
            health = health_pb2_grpc.HealthStub(chan)
            stub.CreateCollection(search_pb2.CreateCollectionRequest(name=COLLECTION, dim=vectors.shape[1],
                                                                     exact_only=exact_only))
            messages = [search_pb2.Point(vector=v.tolist(), payload=search_pb2.Payload(dataset="b", path=f"{i}.jpg"))
                        for i, v in enumerate(vectors)]
            for _ in stub.Upsert(upsert_messages(COLLECTION, messages, max_points=512)):
                pass
            requests = [search_pb2.SearchBatchRequest(queries=[
                search_pb2.SearchRequest(collection=COLLECTION, vector=q.tolist(), limit=DEPTH, exact=True)
                for q in vectors[start:start + args.batch]]) for start in range(0, len(vectors), args.batch)]
            stub.SearchBatch(requests[0])  # warm-up
            stop = threading.Event()
            probes: list[tuple[float, float]] = []
            failures: list[str] = []
            prober = threading.Thread(target=paced, args=(
                [lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)], 0.1, stop, probes, failures))
            prober.start()
            answered, start, i = 0, time.monotonic(), 0
            while time.monotonic() - start < args.seconds:
                answered += len(stub.SearchBatch(requests[i % len(requests)], timeout=120).results)
                i += 1
            elapsed = time.monotonic() - start
            stop.set()
            prober.join()
            if failures:
                raise SystemExit(f"{label}: health probes failed: {failures[:3]}")
            p99 = percentile_ms([latency for _, latency in probes], 99)
            qps = answered / elapsed
            log(f"  {label}: {len(probes)} health probes, p50 "
                f"{percentile_ms([latency for _, latency in probes], 50):.1f} ms, p99 {p99:.1f} ms, max "
                f"{max(latency for _, latency in probes) * 1000:.1f} ms; {qps:.0f} exact queries/s")
            return p99, qps
    finally:
        server.terminate()
        server.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=8677)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=256, help="queries per SearchBatch (the evaluator sends 256)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of back-to-back batches per setting")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, args.dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 100, args.points)] + 0.5 * rng.standard_normal((args.points, args.dim),
                                                                                       dtype=np.float32)
    log(f"[1/3] one engine call per batch ({args.points} x {args.dim}-d, batches of {args.batch} exact queries)")
    unsliced = run("unsliced", 2**62, vectors, args)
    log(f"[2/3] batches sliced at {SCAN_COMPONENTS_PER_CALL:,} components per engine call (the default)")
    sliced = run("sliced", SCAN_COMPONENTS_PER_CALL, vectors, args)
    log("[3/3] an exact-only collection (the evaluator's kind): answered by the in-memory scan, "
        "BLAS without the GIL")
    scan = run("scan", SCAN_COMPONENTS_PER_CALL, vectors, args, exact_only=True)
    print(f"RESULT health_p99_ms_sliced={sliced[0]:.1f} health_p99_ms_unsliced={unsliced[0]:.1f} "
          f"qps_sliced={sliced[1]:.0f} qps_unsliced={unsliced[1]:.0f} health_p99_ms_scan={scan[0]:.1f} "
          f"qps_scan={scan[1]:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
