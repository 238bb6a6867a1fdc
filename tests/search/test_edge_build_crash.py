"""Crash safety of Edge index builds: SIGKILL at every build step loses no acknowledged point.

A writer process (``tests.search.build_crash_writer``) builds while it writes and kills itself at
one step; the data directory must then open with every acknowledged point, on the generation the
step implies (the old one up to the switch of ``current.json``, the new one after it), with no
stray shard directory and no orphaned build process, and must build again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition
from services.search.edge_store import BUILD_STEPS, EdgeStore
from services.search.store import IndexStatus, point_id
from tests.conftest import REPO
from tests.search.build_crash_writer import PARAMS, batch_points

# Up to and including "flushed" the old generation (0: shard/) is authoritative; from "switched" on, the new one.
_NEW_GENERATION_FROM = BUILD_STEPS.index("switched")


def _build_processes(data_dir: Path) -> list[int]:
    """Pids of live ``edge_build`` processes working under ``data_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "services.search.edge_build" in cmdline and str(data_dir) in cmdline:
            pids.append(int(entry.name))
    return pids


def _open(data_dir: Path) -> EdgeStore:
    """The store on ``data_dir``, waiting (10 s at most) for a dying build process to let go of the lock."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return EdgeStore(data_dir, PARAMS, index_idle_seconds=None)
        except FailedPrecondition:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("step", BUILD_STEPS)
def test_killed_at_a_build_step_keeps_every_acknowledged_point(tmp_path: Path, step: str) -> None:
    data_dir = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    writer = subprocess.Popen([sys.executable, "-m", "tests.search.build_crash_writer", str(data_dir), step],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    lines: list[str] = []
    try:
        out, _ = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    for line in out.splitlines():
        lines.append(line)
        if line.startswith("ack "):
            acked.append(int(line.split()[1]))
    assert writer.returncode == -signal.SIGKILL, f"the writer was not killed at {step!r}: {lines[-3:]}"
    assert acked == list(range(len(acked))) and len(acked) >= 32  # the build recorded writes to replay

    deadline = time.monotonic() + 10
    while _build_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = _build_processes(data_dir)
    for pid in orphans:  # the test's own grandchildren, by pid
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "the build process outlived the killed service"

    store = _open(data_dir)
    try:
        collection_dir = data_dir / "collections" / "crash"
        generation = 1 if BUILD_STEPS.index(step) >= _NEW_GENERATION_FROM else 0
        expected_shard = "shard" if generation == 0 else "shard-1"
        assert sorted(p.name for p in collection_dir.iterdir() if p.is_dir()) == [expected_shard]
        assert (collection_dir / "current.json").is_file() == (generation == 1)

        expected = [point_id(p.payload.dataset, p.payload.path) for b in acked for p in batch_points(b)]
        present = {p.id for p in store.retrieve("crash", expected, with_vector=False)}
        missing = set(expected) - present
        assert not missing, f"killed at {step!r}: {len(missing)} of {len(expected)} acknowledged points are missing"
        # The batch being written at the kill may or may not have landed; nothing else may appear.
        count = store.count("crash", None)
        assert len(expected) <= count <= len(expected) + 50

        store.optimize("crash")  # builds again from here (a new generation, unless nothing was left to index)
        assert store.stats("crash").status == IndexStatus.GREEN
        assert store.count("crash", None) == count
        after = [p.name for p in collection_dir.iterdir() if p.is_dir()]
        assert after in ([expected_shard], [f"shard-{generation + 1}"])
    finally:
        store.close()
