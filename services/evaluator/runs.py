"""Run bookkeeping for the evaluator service: queue, progress, watchers, cancellation, history.

Every state change of a run (queued, running, its end) is written to ``state_dir`` atomically, so a
restarted evaluator still lists its runs, and a run that was queued or running when the process
died is reported FAILED ("interrupted"), never left looking alive or complete: its reports are
written atomically and only listed once the run succeeded. The history is bounded
(``max_runs_kept`` finished runs; the oldest are forgotten first) and listed page by page.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from services.common.files import atomic_write_text
from services.common.priority import lower_thread_priority
from services.evaluator.runner import Runner
from services.evaluator.spec import ModelResult, RunSpec

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 256  # the tokens this server gives are about 60 characters


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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data: dict[str, Any] = json.loads(text)
        spec = data.pop("spec")
        spec["models"], spec["ks"] = tuple(spec["models"]), tuple(spec["ks"])
        known = {f.name for f in dataclasses.fields(RunSpec)}
        data["reports"] = tuple(data.get("reports", ()))
        return cls(spec=RunSpec(**{k: v for k, v in spec.items() if k in known}), **data)


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


def describe_failure(exc: BaseException) -> str:
    """What a run's ``error`` says: a domain error's own sentence, else the type and message of an
    internal fault (logged with its traceback)."""
    if isinstance(exc, ServiceError):
        return exc.message
    return f"internal error: {type(exc).__name__}: {exc}"


class RunManager:
    """Runs specs on a pool of ``max_concurrent`` workers; watchers see every state change.

    Args:
        runner: makes the runner that executes a spec (one per run).
        max_concurrent: runs executed at once; the others wait QUEUED.
        metrics: where run counts and durations go.
        state_dir: where run records persist (None: memory only, for tests).
        max_runs_kept: finished runs remembered; the oldest are forgotten first.
        max_queued: runs queued or running at once; beyond it ``start`` refuses (with a retry hint).
        niceness: added to the run threads' nice value (``services.common.priority``): a run's metric
            maths must not delay the service's probes.
    """

    def __init__(self, runner: Callable[[], Runner], max_concurrent: int, metrics: EvaluatorMetrics,
                 state_dir: Path | None = None, max_runs_kept: int = 1000, max_queued: int = 100,
                 niceness: int = 0) -> None:
        self._runner = runner
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="run",
                                        initializer=lower_thread_priority, initargs=(niceness,))
        self._runs: dict[str, RunRecord] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._changed = threading.Condition()
        self._metrics = metrics
        self._state_dir = state_dir
        self._max_kept = max_runs_kept
        self._max_queued = max_queued
        if state_dir is not None:
            self._recover(state_dir)

    # -- persistence -------------------------------------------------------------------------------

    def _recover(self, state_dir: Path) -> None:
        """Loads the kept records; runs that were queued or running are now FAILED (interrupted)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(state_dir.glob("*.json")):
            try:
                record = RunRecord.from_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable run record %s: %s", path, exc)
                continue
            if record.state not in TERMINAL:
                record = replace(record, state=FAILED, finished=time.time(), reports=(),
                                 error=f"interrupted: the evaluator stopped while the run was {record.state}; "
                                       "start it again (models whose embedding finished come from the cache)")
                self._persist(record)
            self._runs[record.id] = record
        self._forget_oldest()

    def _persist(self, record: RunRecord) -> None:
        if self._state_dir is not None:
            atomic_write_text(self._state_dir / f"{record.id}.json", record.to_json())

    def _forget_oldest(self) -> None:
        finished = sorted((r for r in self._runs.values() if r.state in TERMINAL), key=lambda r: (r.created, r.id))
        for record in finished[: max(0, len(finished) - self._max_kept)]:
            del self._runs[record.id]
            self._cancel.pop(record.id, None)
            if self._state_dir is not None:
                (self._state_dir / f"{record.id}.json").unlink(missing_ok=True)

    def _update(self, run_id: str, persist: bool = False, **changes: object) -> RunRecord:
        with self._changed:
            record = replace(self._runs[run_id], **changes)  # type: ignore[arg-type]
            record = replace(record, version=record.version + 1)
            self._runs[run_id] = record
            if persist:
                self._persist(record)
                if record.state in TERMINAL:
                    self._forget_oldest()
            self._changed.notify_all()
            return record

    # -- runs ----------------------------------------------------------------------------------------

    def start(self, spec: RunSpec) -> RunRecord:
        """Validates and queues a run; bad specs fail here, not later."""
        spec.validate()
        run_id = uuid.uuid4().hex[:12]
        record = RunRecord(id=run_id, spec=spec)
        with self._changed:
            waiting = sum(r.state not in TERMINAL for r in self._runs.values())
            if waiting >= self._max_queued:
                raise ResourceExhausted(f"{waiting} runs are queued or running, the limit is {self._max_queued} "
                                        "(EVALUATOR_MAX_QUEUED_RUNS); retry when some have finished",
                                        retry_after=30.0)
            self._runs[run_id] = record
            self._cancel[run_id] = threading.Event()
            self._persist(record)
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
            self._update(run_id, persist=True, state=RUNNING)

            def progress(stage: str, done: int, total: int, message: str) -> None:
                self._update(run_id, stage=stage, done=done, total=total, message=message)

            results: list[ModelResult] = self._runner().run(self._runs[run_id].spec, progress, cancelled,
                                                            run_id=run_id)
            metrics = {f"{r.model}/{k}": v for r in results for k, v in r.metrics.items()}
            status = SUCCEEDED
            self._update(run_id, persist=True, state=SUCCEEDED, metrics=metrics,
                         reports=tuple(str(r.report_path) for r in results), finished=time.time())
        except Cancelled as exc:
            status = CANCELLED
            self._update(run_id, persist=True, state=CANCELLED, error=exc.message, finished=time.time())
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("run %s failed", run_id)
            else:
                log.warning("run %s failed: %s", run_id, exc.message)
            self._update(run_id, persist=True, state=FAILED, error=describe_failure(exc), finished=time.time())
        finally:
            self._metrics.runs.labels(status).inc()
            self._metrics.run_seconds.observe(time.time() - start)
            self._metrics.in_progress.dec()

    def get(self, run_id: str) -> RunRecord:
        with self._changed:
            if run_id not in self._runs:
                raise NotFound(f"no run {run_id!r} (finished runs are kept up to EVALUATOR_MAX_RUNS_KEPT)")
            return self._runs[run_id]

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[RunRecord], str]:
        """One page of runs, newest first, and the token of the next page ('' when there is none).

        Raises:
            InvalidArgument: a page size over ``MAX_PAGE_SIZE``, or a token this server did not give.
        """
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is over the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        after: tuple[float, str] | None = None
        if page_token:
            try:
                if len(page_token) > MAX_PAGE_TOKEN_CHARS:
                    raise ValueError("too long")
                created, run_id = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after = (float(created), str(run_id))
            except (ValueError, TypeError, binascii.Error, RecursionError):
                raise InvalidArgument("page_token is not one this server gave (take next_page_token "
                                      "from the previous response)") from None
        with self._changed:
            ordered = sorted(self._runs.values(), key=lambda r: (r.created, r.id), reverse=True)
        if after is not None:
            ordered = [r for r in ordered if (r.created, r.id) < after]
        page = ordered[:size]
        more = len(ordered) > size
        token = base64.urlsafe_b64encode(json.dumps([page[-1].created, page[-1].id]).encode()).decode() \
            if more and page else ""
        return page, token

    def cancel(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record.state in TERMINAL:
            raise FailedPrecondition(f"run {run_id} already {record.state}")
        self._cancel[run_id].set()
        if record.state == QUEUED:
            return self._update(run_id, persist=True, state=CANCELLED, error="cancelled before it started",
                                finished=time.time())
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
