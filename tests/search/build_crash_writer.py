"""A writer process for the index-build crash tests: writes, builds, and SIGKILLs itself at one build step.

Usage: ``python -m tests.search.build_crash_writer DATA_DIR STEP``. Creates collection ``crash``
(dim 32, HNSW for segments over 20 KiB), upserts ``INITIAL`` batches, then starts an index build
while a writer thread goes on upserting batch after batch (WAL only, no fsync, as in
``crash_writer``), printing ``ack <batch>`` once each ``upsert`` has returned. At build step STEP
(one of ``BUILD_STEPS``) the process kills itself with SIGKILL. At ``copied`` it first waits for two
more acknowledged batches, so that the build has writes to replay at every later step; at
``spawned`` it first stops (SIGSTOP) the build process it just started.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from services.search.edge_store import EdgeStore
from services.search.store import CollectionMeta, IndexParams, Point, point_id
from tests.search.conftest import clustered, make_points

BATCH = 50
DIM = 32
INITIAL = 30  # batches before the build: 1,500 points, 192 KiB of vectors, well over the threshold
PARAMS = IndexParams(m=8, ef_construct=32, indexing_threshold_kb=20)
# Steps at which the build holds the collection's write lock: waiting for acks there would deadlock.
_UNDER_WRITE_LOCK = ("flushed", "switched")


def batch_points(batch: int) -> list[Point]:
    """Batch ``batch``'s points, with their ids derived from (dataset, path) as the core would."""
    vectors, labels = clustered(BATCH, DIM, seed=batch)
    return [replace(p, id=point_id(p.payload.dataset, p.payload.path))
            for p in make_points(vectors, labels, dataset=f"b{batch}")]


def _children(niced: bool) -> list[int]:
    """Pids of this process's children (with ``niced``: only those with a positive niceness)."""
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/<pid>/stat after the command name: state, ppid (field 4), ..., nice (field 19).
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and (not niced or int(fields[16]) > 0):
                pids.append(int(entry.name))
    return pids


def main(data_dir: str, step: str) -> None:
    acked = [0]
    mark = [0]

    def hook(name: str) -> None:
        if name == "copied":
            mark[0] = acked[0]
        if name != step:
            return
        if name not in _UNDER_WRITE_LOCK:
            deadline = time.monotonic() + 20
            while acked[0] < mark[0] + 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        if name == "spawned":
            # Freeze the build process once it has lowered its priority (which it does right after
            # asking to die with its parent), so that only the kernel (PR_SET_PDEATHSIG) can end it:
            # an orphan that merely finished its small build quickly would pass the test otherwise.
            deadline = time.monotonic() + 20
            while not (children := _children(niced=True)) and time.monotonic() < deadline:
                time.sleep(0.005)
            for child in children:
                os.kill(child, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGKILL)

    store = EdgeStore(Path(data_dir), PARAMS, index_idle_seconds=None, build_hook=hook)
    store.create_collection(CollectionMeta("crash", DIM))
    for batch in range(INITIAL):
        store.upsert("crash", batch_points(batch))
        print(f"ack {batch}", flush=True)
        acked[0] += 1

    def write() -> None:
        batch = INITIAL
        while True:
            store.upsert("crash", batch_points(batch))
            print(f"ack {batch}", flush=True)
            acked[0] += 1
            batch += 1
            time.sleep(0.005)

    threading.Thread(target=write, daemon=True).start()
    store.optimize("crash")
    print("built", flush=True)  # the step was never reached: the test fails on this line
    time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
