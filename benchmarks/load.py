"""The local stack under load and under a hostile client, side by side in one run.

- 64 concurrent clients (half embed, half search) send back-to-back requests for ``--seconds``
  through the three-process stack (encoder efficientnet-lite0, search on Qdrant Edge, evaluator),
  every service requiring a bearer token: EmbedImages of 1-4 real Caltech-101 images; Search,
  SearchBatch, SearchById and Count on a 2,000-point collection of real embeddings.
- At the same time an unauthenticated client holds 64 idle streams open (health Watch streams on
  the encoder and the search service: the only streams a caller without a token may open) and
  keeps trying to open StreamEmbedImages and Upsert streams without a token (refused at once).
- A prober checks every service's health every 100 ms. The clients run niced (they stand for other
  machines); the services and the prober do not.

Expected outcomes: OK, or RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo (designed load
shedding: the client waits as told and retries); the unauthenticated client's refusals are
UNAUTHENTICATED. Anything else is an unexpected error.

Prints progress every 10 s, a summary (throughput, latency percentiles, codes, each service's peak
RSS from /proc VmHWM) and last:
``RESULT unexpected_errors=<n> p99_ms=<x> peak_rss_mb=<y> requests=<m> health_p99_ms=<h>``
(p99_ms over the 64 clients' answered requests; peak_rss_mb the largest service's peak RSS;
health_p99_ms over every probe of every service).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc  # noqa: E402

from services.common.clients import EncoderClient, Endpoint, SearchClient, channel  # noqa: E402
from services.common.errors import retry_after_of  # noqa: E402
from services.stack import HEALTH_NAMES, Stack, StackConfig  # noqa: E402

DATASET = Path(os.environ.get("RETRIEVAL_SHARED_DIR", ROOT.parent / "shared")) / "datasets" / "caltech101"
COLLECTION = "load__efficientnet-lite0"
# The clients run niced on the services' own two cores: in production they are other machines, and
# at equal priority their 64 busy threads would take the CPU the services answer with. The services,
# and the health prober (kubelet's stand-in), keep the normal priority.
NICE_CLIENTS = 10


def log(message: str) -> None:
    print(message, flush=True)


def sample(count: int, seed: int) -> list[tuple[str, str]]:
    lines = [ln.split("\t") for ln in (DATASET / "list_of_images.txt").read_text().splitlines() if ln.strip()]
    return [(p, c) for p, c in random.Random(seed).sample(lines, count)]


class Tally:
    """Latencies of answered requests and outcome counts, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def record(self, kind: str, seconds: float | None, code: str, detail: str = "", expected: bool = True) -> None:
        with self.lock:
            if seconds is not None:
                self.latencies.append(seconds)
            self.codes[f"{kind} {code}"] += 1
            if not expected:
                self.unexpected.append(f"{kind} {code}: {detail[:200]}")


def call(tally: Tally, kind: str, fn: Callable[[], object], stop: threading.Event) -> None:
    """One request; a load-shedding refusal waits its retry hint (as a well-behaved client does)."""
    start = time.perf_counter()
    try:
        fn()
        tally.record(kind, time.perf_counter() - start, "OK")
    except grpc.RpcError as exc:
        code = exc.code()
        hint = retry_after_of(exc) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        tally.record(kind, None, code.name, exc.details() or "", expected=hint is not None)
        if hint is not None:
            stop.wait(hint)


def embed_client(k: int, address: str, token: str, images: list[bytes], tally: Tally, stop: threading.Event) -> None:
    metadata = [("authorization", f"Bearer {token}")]
    with channel(address) as chan:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        rng = random.Random(k)
        while not stop.is_set():
            batch = [encoder_pb2.Image(data=images[rng.randrange(len(images))]) for _ in range(rng.randint(1, 4))]
            request = encoder_pb2.EmbedImagesRequest(images=batch)
            call(tally, "embed", lambda r=request: stub.EmbedImages(r, metadata=metadata, timeout=60), stop)


def search_client(k: int, address: str, token: str, vectors: np.ndarray, ids: list[str], tally: Tally,
                  stop: threading.Event) -> None:
    metadata = [("authorization", f"Bearer {token}")]
    with channel(address) as chan:
        stub = search_pb2_grpc.SearchServiceStub(chan)
        rng = random.Random(100 + k)
        while not stop.is_set():
            q = rng.randrange(len(vectors))
            choice = rng.random()
            if choice < 0.5:
                request: object = search_pb2.SearchRequest(collection=COLLECTION, vector=vectors[q].tolist(),
                                                           limit=10, with_payload=True)
                fn = stub.Search
            elif choice < 0.7:
                request = search_pb2.SearchBatchRequest(queries=[search_pb2.SearchRequest(
                    collection=COLLECTION, query_point_id=ids[rng.randrange(len(ids))], limit=10) for _ in range(16)])
                fn = stub.SearchBatch
            elif choice < 0.9:
                request = search_pb2.SearchByIdRequest(collection=COLLECTION, id=ids[q], limit=10, exact=True)
                fn = stub.SearchById
            else:
                request = search_pb2.CountRequest(collection=COLLECTION)
                fn = stub.Count
            call(tally, "search", lambda f=fn, r=request: f(r, metadata=metadata, timeout=60), stop)


def hostile_client(addresses: dict[str, str], streams: int, tally: Tally, stop: threading.Event) -> list[object]:
    """Opens ``streams`` idle health watches without a token, and keeps knocking on streaming RPCs."""
    opened: list[object] = []
    channels = {name: channel(address) for name, address in addresses.items()}
    targets = ["encoder", "search"]
    for i in range(streams):
        name = targets[i % len(targets)]
        watch = health_pb2_grpc.HealthStub(channels[name]).Watch(health_pb2.HealthCheckRequest())
        next(watch)  # open and answered: now idle
        opened.append(watch)

    def knock() -> None:
        encoder = encoder_pb2_grpc.EncoderServiceStub(channels["encoder"])
        search = search_pb2_grpc.SearchServiceStub(channels["search"])

        def idle() -> Iterator[object]:
            stop.wait(5)
            return
            yield

        while not stop.is_set():
            for name, opener in (("hostile StreamEmbedImages", lambda: list(encoder.StreamEmbedImages(idle()))),
                                 ("hostile Upsert", lambda: list(search.Upsert(idle())))):
                try:
                    opener()
                    tally.record(name, None, "OK", "a stream without a token was served", expected=False)
                except grpc.RpcError as exc:
                    expected = exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    tally.record(name, None, exc.code().name, exc.details() or "", expected=expected)
            stop.wait(0.2)

    threading.Thread(target=knock, name="hostile-knock", daemon=True).start()
    return opened


def prober(addresses: dict[str, str], samples: dict[str, list[float]], stop: threading.Event) -> None:
    stubs = {name: health_pb2_grpc.HealthStub(channel(address)) for name, address in addresses.items()}
    while not stop.is_set():
        for name, stub in stubs.items():
            start = time.perf_counter()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_NAMES[name]), timeout=2).status
                ok = status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            samples[name].append((time.perf_counter() - start) * 1000 if ok else float("inf"))
        stop.wait(0.1)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_worker(clients: list[int], addresses: dict[str, str], token: str, images: list[bytes],
                vectors: np.ndarray, ids: list[str], seconds: float, out: Queue[object]) -> None:
    """One process of client threads (several processes, so the clients' own GIL is not the bottleneck)."""
    os.nice(NICE_CLIENTS)
    tally, stop = Tally(), threading.Event()
    threads = []
    for k in clients:
        if k % 2 == 0:
            threads.append(threading.Thread(target=embed_client, daemon=True,
                                            args=(k, addresses["encoder"], token, images, tally, stop)))
        else:
            threads.append(threading.Thread(target=search_client, daemon=True,
                                            args=(k, addresses["search"], token, vectors, ids, tally, stop)))
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(5.0, left))
        with tally.lock:
            out.put(("progress", len(tally.latencies), len(tally.unexpected)))
    stop.set()
    for t in threads:
        t.join(90)
    out.put(("done", tally.latencies, dict(tally.codes), tally.unexpected))


def hostile_worker(addresses: dict[str, str], streams: int, seconds: float, out: Queue[object]) -> None:
    os.nice(NICE_CLIENTS)
    tally, stop = Tally(), threading.Event()
    opened = hostile_client(addresses, streams, tally, stop)
    time.sleep(seconds)
    stop.set()
    time.sleep(0.5)
    for watch in opened:
        watch.cancel()  # type: ignore[attr-defined]
    out.put(("done", [], dict(tally.codes), tally.unexpected))


def probe_worker(addresses: dict[str, str], seconds: float, out: Queue[object]) -> None:
    samples: dict[str, list[float]] = {s: [] for s in addresses}
    stop = threading.Event()
    thread = threading.Thread(target=prober, args=(addresses, samples, stop), daemon=True)
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(10)
    out.put(("health", samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, half embed, half search")
    parser.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over")
    parser.add_argument("--idle-streams", type=int, default=64, help="idle streams of the unauthenticated client")
    parser.add_argument("--images", type=int, default=256, help="real Caltech-101 images the embed clients send")
    args = parser.parse_args()

    token = secrets.token_hex(16)
    work = Path(tempfile.mkdtemp(prefix="load-"))
    config = StackConfig.on_free_ports(data_dir=work / "qdrant", log_dir=work / "logs", output_dir=work / "reports",
                                       cache_dir=work / "cache", allowed_roots=(DATASET,), auth_token=token)
    log(f"[1/4] starting the stack (token required; logs in {config.log_dir})")
    with Stack(config) as stack:
        addresses = {s: config.address(s) for s in ("encoder", "search", "evaluator")}
        chosen = sample(args.images + 2000, seed=1)
        images = [(DATASET / p).read_bytes() for p, _ in chosen[: args.images]]
        log("[2/4] indexing 2,000 real embeddings for the search clients")
        with EncoderClient(Endpoint(addresses["encoder"], token=token)) as encoder, \
                SearchClient(Endpoint(addresses["search"], token=token)) as search:
            corpus = chosen[args.images:]
            embedded = encoder.embed_files(DATASET, [p for p, _ in corpus], model="efficientnet-lite0")
            vectors = embedded.vectors[embedded.ok]
            kept = [item for item, ok in zip(corpus, embedded.ok, strict=True) if ok]
            search.create_collection(COLLECTION, vectors.shape[1], "efficientnet-lite0", "caltech101")
            ids = search.upsert(COLLECTION, "caltech101", [p for p, _ in kept], [[c] for _, c in kept], vectors).ids
        log(f"[3/4] {args.clients} clients in {args.processes} processes for {args.seconds:.0f} s, "
            f"{args.idle_streams} idle unauthenticated streams open, health probed every 100 ms from its own process")
        context = mp.get_context("spawn")
        out: Queue[object] = context.Queue()
        workers = [context.Process(target=hostile_worker, args=(addresses, args.idle_streams, args.seconds + 4, out)),
                   context.Process(target=probe_worker, args=(addresses, args.seconds + 2, out))]
        shares = [list(range(args.clients))[i::args.processes] for i in range(args.processes)]
        workers += [context.Process(target=load_worker, args=(share, addresses, token, images, vectors, ids,
                                                              args.seconds, out)) for share in shares]
        workers[0].start()
        time.sleep(2.0)  # the idle streams are open before the load starts, and stay open after it
        start = time.monotonic()
        for w in workers[1:]:
            w.start()
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        unexpected: list[str] = []
        health: dict[str, list[float]] = {}
        finished = 0
        while finished < len(workers):
            message = out.get(timeout=args.seconds + 300)
            kind = message[0]  # type: ignore[index]
            if kind == "progress":
                log(f"  {time.monotonic() - start:5.0f} s: requests answered so far in one client process: "
                    f"{message[1]}, unexpected errors: {message[2]}")  # type: ignore[index]
                continue
            finished += 1
            if kind == "health":
                health = message[1]  # type: ignore[index]
            else:
                latencies += message[1]  # type: ignore[index]
                codes.update(message[2])  # type: ignore[index]
                unexpected += message[3]  # type: ignore[index]
        duration = time.monotonic() - start
        for w in workers:
            w.join(60)
        rss = {s: peak_rss_mb(p.pid) for s, p in stack.processes.items()}

    log("[4/4] results")
    ms = np.array(latencies) * 1000
    probes = np.array([v for values in health.values() for v in values])
    answered = len(ms)
    print(f"\n| | value |\n|---|---|\n| requests answered | {answered} ({answered / duration:.1f}/s) |")
    for q in (50, 90, 99):
        print(f"| latency p{q} | {np.percentile(ms, q):.1f} ms |")
    for name, values in health.items():
        arr = np.array(values)
        print(f"| health {name}: probes, p50, p99, max | {len(arr)}, {np.percentile(arr, 50):.1f}, "
              f"{np.percentile(arr, 99):.1f}, {arr.max():.1f} ms |")
    for name, mb in rss.items():
        print(f"| peak RSS {name} | {mb:.0f} MB |")
    for key, count in sorted(codes.items()):
        print(f"| {key} | {count} |")
    for line in unexpected[:10]:
        print(f"unexpected: {line}")
    print(f"RESULT unexpected_errors={len(unexpected)} p99_ms={np.percentile(ms, 99):.1f} "
          f"peak_rss_mb={max(rss.values()):.0f} requests={answered} health_p99_ms={np.percentile(probes, 99):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
