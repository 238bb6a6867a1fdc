"""Dynamic batching: items from concurrent requests are run through the model together.

A worker thread takes the first waiting item, then keeps collecting until the batch holds
``max_batch_size`` items or ``max_delay`` seconds have passed since that first item. Items whose
caller's deadline has passed, or whose caller went away, are dropped before the model runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.common.priority import lower_thread_priority

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T, R]):
    item: T
    future: Future[R]
    deadline: float | None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)


_STOP = object()


class DynamicBatcher(Generic[T, R]):
    """Runs ``run_batch`` on batches of submitted items in one worker thread.

    Args:
        run_batch: takes a list of items, returns one result per item in the same order (a result
            may itself be an error value; an exception fails every item of the batch).
        max_batch_size: most items per call of ``run_batch`` (1 turns batching off).
        max_delay: longest wait, in seconds, for more items after the first one of a batch.
        max_queue: items allowed to wait; beyond it ``submit`` raises ResourceExhausted.
        name: thread name, for logs.
        on_batch: called with (batch size, seconds spent in the queue per item) after each batch.
        niceness: added to the worker thread's nice value (and so to the compute threads it starts;
            ``services.common.priority``), so that the service's probes win the CPU over the model.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue: int,
        name: str,
        on_batch: Callable[[int, list[float]], None] | None = None,
        niceness: int = 0,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, args=(niceness,), name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items submitted and not yet taken into a batch."""
        return self._pending

    def submit_many(self, items: Sequence[T], deadline: float | None = None) -> list[Future[R]]:
        """Queues ``items`` (all or none) and returns one future per item.

        Raises:
            ResourceExhausted: the queue cannot take all of them.
            Unavailable: the batcher is shut down.
        """
        with self._lock:
            if self._closed:
                raise Unavailable("encoder is shutting down")
            if self._pending + len(items) > self.max_queue:
                raise ResourceExhausted(
                    f"encoder queue full: {self._pending} items waiting, {len(items)} more would "
                    f"exceed the limit of {self.max_queue}; retry with backoff")
            self._pending += len(items)
        futures: list[Future[R]] = []
        for item in items:
            fut: Future[R] = Future()
            futures.append(fut)
            self._queue.put(_Job(item, fut, deadline))
        return futures

    def close(self, timeout: float = 5.0) -> None:
        """Stops taking items; the worker finishes what is queued, then exits. Whatever it could
        not finish within ``timeout`` seconds fails with Unavailable (no caller waits forever)."""
        with self._lock:
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(Unavailable("encoder is shutting down"))

    def _take_batch(self) -> tuple[list[_Job[T, R]], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        stop = False
        close_at = time.monotonic() + self.max_delay
        while len(batch) < self.max_batch_size:
            try:
                # Whatever is already waiting joins without delay; then wait out max_delay.
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _STOP:
                stop = True
                break
            batch.append(job)
        with self._lock:
            self._pending -= len(batch)
        return batch, stop

    def _loop(self, niceness: int) -> None:
        lower_thread_priority(niceness)  # before the first batch starts the compute threads
        stop = False
        while not stop:
            batch, stop = self._take_batch()
            now = time.monotonic()
            live: list[_Job[T, R]] = []
            for job in batch:
                if not job.future.set_running_or_notify_cancel():
                    continue  # caller went away
                if job.deadline is not None and now > job.deadline:
                    job.future.set_exception(DeadlineExceeded("deadline passed while queued for the model"))
                    continue
                live.append(job)
            if not live:
                continue
            try:
                results = self._run_batch([j.item for j in live])
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
            except BaseException as exc:
                log.exception("batch of %d failed", len(live))
                for job in live:
                    job.future.set_exception(exc)
                continue
            for job, result in zip(live, results, strict=True):
                job.future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(len(live), [now - j.enqueued for j in live])
