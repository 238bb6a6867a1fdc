"""Run bookkeeping for the evaluator service: queue, progress, watchers, cancellation."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import Cancelled, FailedPrecondition, NotFound
from services.evaluator.runner import ModelResult, Runner, RunSpec

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


@dataclass(frozen=True)
class RunRecord:
    """A snapshot of one run. Times are Unix seconds; ``metrics`` maps "<model>/<metric>" to values."""

    id: str
    spec: RunSpec
    state: str = QUEUED
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reports: tuple[str, ...] = ()
    error: str = ""
    version: int = 0


class EvaluatorMetrics:
    """Domain metrics of the evaluator (prefix ``evaluator_``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter("evaluator_runs_total", "Runs finished, by final status.", ["status"], registry=registry)
        self.run_seconds = Histogram("evaluator_run_seconds", "Wall time of finished runs, in seconds.",
                                     buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200), registry=registry)
        self.queries = Counter("evaluator_queries_evaluated_total", "Queries scored by finished model evaluations.",
                               registry=registry)
        self.in_progress = Gauge("evaluator_runs_in_progress", "Runs queued or running.", registry=registry)
        for status in (SUCCEEDED, FAILED, CANCELLED):
            self.runs.labels(status)


class RunManager:
    """Runs specs on a pool of ``max_concurrent`` workers; watchers see every state change."""

    def __init__(self, runner: Callable[[], Runner], max_concurrent: int, metrics: EvaluatorMetrics) -> None:
        self._runner = runner
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="run")
        self._runs: dict[str, RunRecord] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._changed = threading.Condition()
        self._metrics = metrics

    def _update(self, run_id: str, **changes: object) -> RunRecord:
        with self._changed:
            record = replace(self._runs[run_id], **changes)  # type: ignore[arg-type]
            record = replace(record, version=record.version + 1)
            self._runs[run_id] = record
            self._changed.notify_all()
            return record

    def start(self, spec: RunSpec) -> RunRecord:
        """Validates and queues a run; bad specs fail here, not later."""
        spec.validate()
        run_id = uuid.uuid4().hex[:12]
        record = RunRecord(id=run_id, spec=spec)
        with self._changed:
            self._runs[run_id] = record
            self._cancel[run_id] = threading.Event()
        self._metrics.in_progress.inc()
        self._pool.submit(self._execute, run_id)
        return record

    def _execute(self, run_id: str) -> None:
        cancelled = self._cancel[run_id]
        start = time.time()
        status = FAILED
        try:
            if cancelled.is_set():
                raise Cancelled("cancelled before it started")
            self._update(run_id, state=RUNNING)

            def progress(stage: str, done: int, total: int, message: str) -> None:
                self._update(run_id, stage=stage, done=done, total=total, message=message)

            results: list[ModelResult] = self._runner().run(self._runs[run_id].spec, progress, cancelled)
            metrics = {f"{r.model}/{k}": v for r in results for k, v in r.metrics.items()}
            status = SUCCEEDED
            self._update(run_id, state=SUCCEEDED, metrics=metrics, reports=tuple(str(r.report_path) for r in results),
                         finished=time.time())
        except Cancelled as exc:
            status = CANCELLED
            self._update(run_id, state=CANCELLED, error=exc.message, finished=time.time())
        except Exception as exc:
            log.exception("run %s failed", run_id)
            self._update(run_id, state=FAILED, error=f"{type(exc).__name__}: {exc}", finished=time.time())
        finally:
            self._metrics.runs.labels(status).inc()
            self._metrics.run_seconds.observe(time.time() - start)
            self._metrics.in_progress.dec()

    def get(self, run_id: str) -> RunRecord:
        with self._changed:
            if run_id not in self._runs:
                raise NotFound(f"no run {run_id!r}")
            return self._runs[run_id]

    def list(self) -> list[RunRecord]:
        with self._changed:
            return sorted(self._runs.values(), key=lambda r: r.created)

    def cancel(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record.state in TERMINAL:
            raise FailedPrecondition(f"run {run_id} already {record.state}")
        self._cancel[run_id].set()
        if record.state == QUEUED:
            return self._update(run_id, state=CANCELLED, error="cancelled before it started", finished=time.time())
        return record

    def watch(self, run_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[RunRecord]:
        """Yields the run now and after every change, until it ends or ``is_active`` turns false."""
        seen = -1
        while is_active():
            with self._changed:
                record = self.get(run_id)
                if record.version == seen:
                    self._changed.wait(timeout=1.0)
                    record = self.get(run_id)
            if record.version != seen:
                seen = record.version
                yield record
                if record.state in TERMINAL:
                    return

    def close(self) -> None:
        for event in self._cancel.values():
            event.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
