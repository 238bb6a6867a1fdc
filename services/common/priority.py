"""CPU priority of the threads that do requests' work, below the threads that answer probes.

A service whose work saturates its CPUs must still answer its health checks quickly: kubelet
restarts a pod whose liveness probe times out, and a prober's latency is what an on-call engineer
reads as "the service is up". Admission (``services.common.server``) keeps probes from waiting for
a *thread*; this module keeps them from waiting for a *CPU*: the threads that do the work (unary
and stream handlers, the encoder's decode and batch threads, and the compute threads those start)
run with a higher nice value than grpcio's polling threads and the probe pool, so the scheduler
runs a probe as soon as it is ready instead of sharing the CPU with every busy worker (CFS weight
of nice 0 against nice 5 is 3:1, against nice 10 about 9:1).

Linux keeps the nice value per thread (``setpriority(PRIO_PROCESS, tid)``), and a thread inherits
its creator's value, so the OpenMP team PyTorch starts from a lowered batch thread is lowered too.
Elsewhere the nice value is per process, so nothing is changed there. Raising the nice value needs
no privilege; lowering it back would, so a lowered thread stays lowered (pools are per kind of
work, so a thread never changes kind).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PER_THREAD = sys.platform.startswith("linux")
_warned = threading.Event()


def thread_niceness() -> int:
    """The calling thread's nice value (the process's where nice is per process)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id() if PER_THREAD else 0)


def lower_thread_priority(niceness: int) -> None:
    """Sets the calling thread's nice value to the process's (its main thread's) plus ``niceness``,
    capped at 19; a thread already that low, or ``niceness`` 0, is left as it is. Absolute rather
    than relative, so a thread started by a lowered thread (which inherits its value) is not lowered
    twice.

    Only on Linux, where it touches the calling thread alone; a refusal (a sandbox without
    setpriority) is logged once and ignored: priority is a preference, not a correctness matter.
    """
    if niceness <= 0 or not PER_THREAD:
        return
    tid = threading.get_native_id()
    try:
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + niceness)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as exc:
        if not _warned.is_set():
            _warned.set()
            log.warning("could not lower the priority of worker threads (%s); they run at the probes' priority",
                        exc)


def call_lowered(niceness: int, fn: Callable[[], T]) -> T:
    """``fn()`` on a short-lived thread of lowered priority, for calls that start threads of their
    own (a Qdrant Edge shard starts its search threads when it is created or loaded): those inherit
    the lowered value. Returns ``fn``'s result or raises its exception; with ``niceness`` 0, or
    where nice is per process, ``fn`` runs on the calling thread."""
    if niceness <= 0 or not PER_THREAD:
        return fn()
    with ThreadPoolExecutor(1, thread_name_prefix="lowered-call", initializer=lower_thread_priority,
                            initargs=(niceness,)) as pool:
        return pool.submit(fn).result()
