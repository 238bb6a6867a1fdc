"""What keeps a busy service's health checks fast (issue 9, benchmarks/load.py): the work runs below
the probes' CPU priority (services.common.priority: the shared server's pools, the encoder's decode,
batch, load and compute threads, Qdrant Edge's search threads), and the start-up heap is frozen so
that full garbage collections, which hold the GIL, stay short.

Before: every thread of a service ran at the process's priority, so a service whose work saturated
its CPUs shared them evenly between its busy workers and its health checks (benchmarks/load.py,
issue 9).
"""

from __future__ import annotations

import gc
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.priority import PER_THREAD, call_lowered, lower_thread_priority, thread_niceness
from services.common.settings import ServerSettings
from tests.common.conftest import serve_fake

pytestmark = pytest.mark.skipif(not PER_THREAD, reason="nice is per process outside Linux: nothing to lower")


def base() -> int:
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


def native_niceness(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _comm(tid: str) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:  # the thread ended
        return ""


def on_thread(fn):  # type: ignore[no-untyped-def]
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_a_thread_is_lowered_to_the_process_priority_plus_niceness_never_twice() -> None:
    def work() -> tuple[int, int, int]:
        lower_thread_priority(5)
        first = thread_niceness()
        lower_thread_priority(5)  # absolute, not cumulative
        # A thread it starts inherits the lowered value; lowering it again changes nothing.
        child = on_thread(lambda: (lower_thread_priority(5), thread_niceness())[1])
        return first, thread_niceness(), child  # type: ignore[return-value]

    assert on_thread(work) == (base() + 5, base() + 5, base() + 5)
    assert thread_niceness() == base()  # the calling thread is untouched
    assert on_thread(lambda: (lower_thread_priority(0), thread_niceness())[1]) == base()


def test_threads_started_inside_a_lowered_call_inherit_its_priority() -> None:
    started: list[int] = []

    def start_a_thread() -> str:
        thread = threading.Thread(target=lambda: started.append(thread_niceness()))
        thread.start()
        thread.join()
        return "done"

    assert call_lowered(7, start_a_thread) == "done"
    assert started == [base() + 7]
    with pytest.raises(ZeroDivisionError):
        call_lowered(7, lambda: 1 / 0)
    assert thread_niceness() == base()


def test_the_server_runs_work_below_its_probes() -> None:
    settings = ServerSettings(port=0, metrics_port=-1, work_niceness=6)
    for running, _, _ in serve_fake(settings):
        pools = running.pools
        assert pools is not None
        assert pools.unary.submit(thread_niceness).result() == base() + 6
        assert pools.streams.submit(thread_niceness).result() == base() + 6
        # Health checks, refusals and watch updates keep the process's priority.
        for pool in (pools.probe, pools.reject, pools.watch_send):
            assert pool.submit(thread_niceness).result() == base()
    for running, _, _ in serve_fake(ServerSettings(port=0, metrics_port=-1, work_niceness=0)):
        assert running.pools is not None and running.pools.unary.submit(thread_niceness).result() == base()


def test_the_encoder_model_threads_run_below_its_probes() -> None:
    from services.encoder.config import EncoderSettings
    from services.encoder.core import EncoderCore
    from tests.encoder.conftest import TINY_DINOV2, plumbing_registry

    gc.unfreeze()
    before = set(os.listdir("/proc/self/task"))
    core = EncoderCore(EncoderSettings(random_weights=True, models=[], metrics_port=-1, port=0, work_niceness=4,
                                       backend="onnxruntime", onnx_threads=2), registry=plumbing_registry())
    try:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="PNG")
        runtime, [outcome] = core.embed_images(TINY_DINOV2.id, [buffer.getvalue()])
        assert not isinstance(outcome, Exception), outcome
        assert gc.get_freeze_count() > 0  # the loaded model is frozen with the rest of the heap
        batcher = runtime.image_batcher._thread  # the thread whose compute team matters
        assert batcher.native_id is not None and native_niceness(batcher.native_id) == base() + 4
        # Every thread the core started (decode pool, loader, batchers, ONNX Runtime's pool) is lowered.
        # Threads grpcio starts for servers and channels of earlier tests carry names of their own
        # (event_engine, grpc_global_tim, ...); the core's, and the ones native code starts for it,
        # are "python".
        started = [tid for tid in set(os.listdir("/proc/self/task")) - before if _comm(tid) == "python"]
        assert len(started) >= 4
        assert {native_niceness(int(tid)) for tid in started if Path(f"/proc/self/task/{tid}").exists()} == \
            {base() + 4}
    finally:
        core.close()


def test_edge_search_threads_run_below_the_probes(tmp_path: Path) -> None:
    from services.search.edge_store import EdgeStore
    from services.search.store import CollectionMeta

    before = set(os.listdir("/proc/self/task"))
    store = EdgeStore(tmp_path / "edge", index_idle_seconds=None, search_niceness=3)
    try:
        store.create_collection(CollectionMeta(name="c", dim=4))
        edge = {tid for tid in set(os.listdir("/proc/self/task")) - before
                if Path(f"/proc/self/task/{tid}/comm").read_text().startswith("edge-search")}
        assert edge, "Qdrant Edge started no search threads"
        assert {native_niceness(int(tid)) for tid in edge} == {base() + 3}
    finally:
        store.close()


def test_a_ready_service_freezes_its_start_up_heap() -> None:
    """A full garbage collection scans only what requests made: the encoder's start-up heap (~400k
    objects with Lite0) took 130-145 ms of GIL per full collection, the tail of its health p99
    under load (issue 9)."""
    gc.unfreeze()
    try:
        for running, _, _ in serve_fake(ServerSettings(port=0, metrics_port=-1)):  # SERVING when it yields
            assert gc.get_freeze_count() > 0
            running.set_serving(False)
            gc.unfreeze()
            running.set_serving(True)  # once: objects alive later are the requests', not the start-up's
            assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
