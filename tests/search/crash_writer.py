"""A writer process for the crash test: upserts batches through an in-process core, printing each ack.

Usage: ``python -m tests.search.crash_writer DATA_DIR``. Writes batch after batch of 50 points (dim 16,
collection ``crash``) with fsync off, so only the write-ahead log stands between an acknowledged
batch and a SIGKILL; prints ``ack <batch>`` after each ``upsert`` returned, until killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.edge_store import EdgeStore
from services.search.store import Point
from tests.search.conftest import clustered, make_points

BATCH = 50
DIM = 16


def batch_points(batch: int) -> list[Point]:
    vectors, labels = clustered(BATCH, DIM, seed=batch)
    return make_points(vectors, labels, dataset=f"b{batch}")


def main(data_dir: str) -> None:
    core = SearchCore(SearchSettings(sync_writes=False), EdgeStore(Path(data_dir), index_idle_seconds=None))
    core.create_collection("crash", DIM, exist_ok=True)
    batch = 0
    while True:
        core.upsert("crash", batch_points(batch))
        print(f"ack {batch}", flush=True)
        batch += 1


if __name__ == "__main__":
    main(sys.argv[1])
