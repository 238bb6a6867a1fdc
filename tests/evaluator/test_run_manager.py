"""The evaluator's run bookkeeping: states, progress watchers, cancellation, failures, metrics."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.evaluator.runs import CANCELLED, FAILED, SUCCEEDED, EvaluatorMetrics, RunManager
from services.evaluator.spec import ModelResult, RunSpec


class FakeRunner:
    """Reports three progress steps; waits on ``gate`` between them; can fail or honour cancellation."""

    def __init__(self, gate: threading.Event, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail

    def run(self, spec: RunSpec, progress: object, cancelled: threading.Event, run_id: str = "") -> list[ModelResult]:
        for step in range(3):
            progress("embedding", step, 3, spec.models[0])  # type: ignore[operator]
            self.gate.wait(5)
            if cancelled.is_set():
                raise Cancelled("run cancelled")
        if self.fail:
            raise RuntimeError("encoder exploded")
        return [ModelResult(model=spec.models[0], report_path=Path("r.json"), metrics={"map": 0.5})]


def _manager(runner: FakeRunner) -> tuple[RunManager, CollectorRegistry]:
    registry = CollectorRegistry()
    return RunManager(lambda: runner, 1, EvaluatorMetrics(registry)), registry  # type: ignore[arg-type,return-value]


SPEC = RunSpec(dataset="/data/x", models=("m",))


def test_a_run_progresses_to_success_and_watchers_see_every_stage() -> None:
    gate = threading.Event()
    gate.set()
    manager, registry = _manager(FakeRunner(gate))
    record = manager.start(SPEC)
    states = [(r.state, r.done) for r in manager.watch(record.id)]
    assert states[-1][0] == SUCCEEDED and manager.get(record.id).metrics == {"m/map": 0.5}
    assert registry.get_sample_value("evaluator_runs_total", {"status": "succeeded"}) == 1.0
    manager.close()


def test_cancel_a_running_run() -> None:
    gate = threading.Event()
    manager, _ = _manager(FakeRunner(gate))
    record = manager.start(SPEC)
    watcher = manager.watch(record.id)
    while next(watcher).state != "running":
        pass
    manager.cancel(record.id)
    gate.set()
    assert [r.state for r in watcher][-1] == CANCELLED
    with pytest.raises(FailedPrecondition):
        manager.cancel(record.id)
    manager.close()


def test_failures_are_recorded_with_the_reason() -> None:
    gate = threading.Event()
    gate.set()
    manager, registry = _manager(FakeRunner(gate, fail=True))
    record = manager.start(SPEC)
    final = list(manager.watch(record.id))[-1]
    assert final.state == FAILED and "encoder exploded" in final.error
    assert registry.get_sample_value("evaluator_runs_total", {"status": "failed"}) == 1.0
    manager.close()


def test_bad_specs_and_unknown_runs() -> None:
    manager, _ = _manager(FakeRunner(threading.Event()))
    with pytest.raises(InvalidArgument, match="protocol"):
        manager.start(RunSpec(dataset="/d", models=("m",), protocol="nope"))
    with pytest.raises(InvalidArgument, match="no models"):
        manager.start(RunSpec(dataset="/d", models=()))
    with pytest.raises(NotFound):
        manager.get("nope")
    manager.close()


def test_history_is_bounded_and_listed_page_by_page(tmp_path: Path) -> None:
    """3,000 failed runs made a 20 MB ListRuns response: every run was kept and listed at once."""
    gate = threading.Event()
    gate.set()
    registry = CollectorRegistry()
    manager = RunManager(lambda: FakeRunner(gate, fail=True), 1, EvaluatorMetrics(registry),  # type: ignore
                         state_dir=tmp_path, max_runs_kept=5)
    ids = []
    for _ in range(8):
        ids.append(manager.start(SPEC).id)
        list(manager.watch(ids[-1]))
    first, token = manager.list(page_size=2)
    assert [r.id for r in first] == ids[:-3:-1] and token  # newest first
    second, token = manager.list(page_size=2, page_token=token)
    third, last = manager.list(page_size=2, page_token=token)
    assert [r.id for r in second + third] == ids[-3:-6:-1] and last == ""
    with pytest.raises(NotFound):
        manager.get(ids[0])  # forgotten: only the newest 5 finished runs are kept
    assert len(list(tmp_path.glob("*.json"))) == 5  # on disk too
    with pytest.raises(InvalidArgument, match="page_token is not one this server gave"):
        manager.list(page_token="bm90IGEgdG9rZW4")
    with pytest.raises(InvalidArgument, match="page_size 5000 is over the maximum of 1000"):
        manager.list(page_size=5000)
    manager.close()


def test_a_restarted_evaluator_reports_interrupted_runs_failed(tmp_path: Path) -> None:
    """A run that was running when the evaluator died must not look alive (or complete) afterwards."""
    gate = threading.Event()
    before = RunManager(lambda: FakeRunner(gate), 1, EvaluatorMetrics(CollectorRegistry()),  # type: ignore
                        state_dir=tmp_path)
    running = before.start(SPEC)
    queued = before.start(SPEC)
    watcher = before.watch(running.id)
    while next(watcher).state != "running":
        pass
    # The process dies here (no close): a new manager opens the same state directory.
    after = RunManager(lambda: FakeRunner(gate), 1, EvaluatorMetrics(CollectorRegistry()),  # type: ignore
                       state_dir=tmp_path)
    for run_id, was in ((running.id, "running"), (queued.id, "queued")):
        record = after.get(run_id)
        assert record.state == FAILED and record.reports == ()
        assert record.error.startswith(f"interrupted: the evaluator stopped while the run was {was}")
    gate.set()
    before.close()
    after.close()


def test_queued_runs_and_models_per_run_are_bounded() -> None:
    gate = threading.Event()
    manager = RunManager(lambda: FakeRunner(gate), 1, EvaluatorMetrics(CollectorRegistry()),  # type: ignore
                         max_queued=3)
    for _ in range(3):
        manager.start(SPEC)
    with pytest.raises(ResourceExhausted, match="3 runs are queued or running, the limit is 3") as err:
        manager.start(SPEC)
    assert err.value.retry_after == 30.0
    with pytest.raises(InvalidArgument, match="33 models; at most 32 per run"):
        RunSpec(dataset="/d", models=tuple(f"m{i}" for i in range(33))).validate()
    gate.set()
    manager.close()
