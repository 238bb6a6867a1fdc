"""A long run followed to its end across connection ageing (issue 9, defect 1): ``retrieval eval run
--evaluator`` died with ``UNAVAILABLE: max connection age`` once WatchRun passed the age grace."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from retrieval.v1 import evaluator_pb2, evaluator_pb2_grpc

from services.common.clients import Endpoint, EvaluatorClient, RetryPolicy
from services.common.server import ServiceRegistration, create_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.runs import EvaluatorMetrics, RunManager
from services.evaluator.servicer import SERVICE, EvaluatorServicer
from services.evaluator.spec import ModelResult, RunSpec


class SlowRunner:
    """A run of ``seconds`` that reports progress every 0.1 s."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, spec: RunSpec, progress: object, cancelled: threading.Event, run_id: str = "") -> list[ModelResult]:
        steps = int(self.seconds / 0.1)
        for step in range(steps):
            progress("embedding", step + 1, steps, "slow")  # type: ignore[operator]
            time.sleep(0.1)
        return [ModelResult(model=spec.models[0], report_path=Path("r.json"), metrics={"map": 0.25})]


def test_a_watch_outlives_connection_ageing_with_a_short_grace(tmp_path: Path) -> None:
    # Connections age out every 0.5 s and calls on them get only 0.3 s more: the server cuts the
    # watch stream many times during a 4-second run; the client re-opens it by run id each time.
    settings = EvaluatorSettings(port=0, metrics_port=-1, max_connection_age_seconds=0.5,
                                 max_connection_age_grace_seconds=0.3, state_dir=tmp_path,
                                 allowed_roots=[tmp_path])
    manager = RunManager(lambda: SlowRunner(4.0), 1, EvaluatorMetrics(CollectorRegistry()))  # type: ignore
    servicer = EvaluatorServicer(manager, settings)
    running = create_server(settings, [ServiceRegistration(
        SERVICE, lambda srv: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, srv))])
    running.set_serving(True)
    try:
        endpoint = Endpoint(f"127.0.0.1:{running.port}", retry=RetryPolicy(attempts=50, initial=0.05, maximum=0.2))
        with EvaluatorClient(endpoint) as client:
            # What the CLI did before: one WatchRun stream, which the server cuts at the age grace.
            run_id = client.start_run(evaluator_pb2.RunSpec(dataset=str(tmp_path), models=["m"]))
            with pytest.raises(grpc.RpcError) as cut:
                list(client.stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id)))
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            # The client re-opens the watch by run id and follows the next run to its end.
            run_id = client.start_run(evaluator_pb2.RunSpec(dataset=str(tmp_path), models=["m"]))
            seen = list(client.watch(run_id))
        assert seen[-1].state == evaluator_pb2.RUN_STATE_SUCCEEDED
        assert seen[-1].metrics["m/map"] == 0.25
        done = [r.progress.done for r in seen if r.progress.stage == "embedding"]
        assert done == sorted(done) and done[-1] == 40  # progress only moves forward across re-opened watches
    finally:
        running.stop(0)
        manager.close()
