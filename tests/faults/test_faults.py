"""Faults while clients work: the search service killed mid-ingest and restarted, a search outage
under load, the evaluator killed mid-run, a long run followed by the CLI across connection ageing
(issue 9, "Fault tests"). Real processes, SIGKILL, real restarts on the same port and data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from retrieval.v1 import evaluator_pb2

from services.common.clients import Endpoint, EvaluatorClient, RetryPolicy, SearchClient, channel, wait_serving
from services.common.errors import ServiceError
from services.common.ids import point_id
from services.stack import Stack, StackConfig, free_port
from tests.conftest import REPO
from tests.evaluator.conftest import write_dataset
from tests.search.conftest import clustered

pytestmark = pytest.mark.slow

DIM = 32
# Patient enough for a restart of the search service (a few seconds here).
PATIENT = RetryPolicy(attempts=40, initial=0.1, maximum=1.0)


def _search_process(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(data_dir.parent / f"search-{port}.log", "ab")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-m", "services.cli", "search", "serve", "--data-dir", str(data_dir),
                             "--port", str(port), "--metrics-port", "-1"],
                            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)


def _ready(port: int) -> None:
    with channel(f"127.0.0.1:{port}") as chan:
        wait_serving(chan, "retrieval.v1.SearchService", timeout=60)


def _kill_and_restart(proc: subprocess.Popen[bytes], data_dir: Path, port: int,
                      down_seconds: float) -> subprocess.Popen[bytes]:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(down_seconds)
    return _search_process(data_dir, port)


def test_ingest_resumes_from_the_last_acknowledged_batch_across_a_sigkill(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    proc = _search_process(data_dir, port)
    try:
        _ready(port)
        client = SearchClient(Endpoint(f"127.0.0.1:{port}", retry=PATIENT, timeout=60))
        client.create_collection("ingest", DIM)
        vectors, labels = clustered(20_000, DIM, seed=7)
        paths = [f"c{c}/{i}.jpg" for i, c in enumerate(labels)]
        acked: list[int] = []
        killed = threading.Event()
        restarted: list[subprocess.Popen[bytes]] = []

        def progress(done: int, _total: int) -> None:
            acked.append(done)
            if done >= 6_000 and not killed.is_set():
                killed.set()
                restarted.append(_kill_and_restart(proc, data_dir, port, down_seconds=1.0))

        summary = client.upsert("ingest", "ds", paths, [[f"c{c}"] for c in labels], vectors, batch=250,
                                progress=progress)
        assert killed.is_set(), "the server was never killed: the test proved nothing"
        assert summary.upserted >= 20_000  # messages re-sent after the kill count again; nothing is lost
        assert client.count("ingest") == 20_000
        stored = {p.id for p in client.scroll("ingest", page=5000)}
        assert stored == {point_id("ds", p) for p in paths}
        client.close()
    finally:
        for p in [proc, *restarted]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_searches_ride_out_a_search_outage(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    proc = _search_process(data_dir, port)
    procs = [proc]
    try:
        _ready(port)
        client = SearchClient(Endpoint(f"127.0.0.1:{port}", retry=PATIENT, timeout=10))
        vectors, labels = clustered(2_000, DIM, seed=8)
        client.create_collection("load", DIM)
        client.upsert("load", "ds", [f"{i}.jpg" for i in range(len(vectors))], [[f"c{c}"] for c in labels], vectors)
        stop, errors, answered = threading.Event(), [], [0]

        def searcher(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                q = int(rng.integers(len(vectors)))
                try:
                    hits = client.search("load", vectors[q], 5, exact=True)
                    assert hits[0].path == f"{q}.jpg"
                    answered[0] += 1
                except (ServiceError, AssertionError) as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=searcher, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        before = answered[0]
        procs.append(_kill_and_restart(proc, data_dir, port, down_seconds=2.0))
        _ready(port)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert before > 0 and answered[0] > before  # answered before the outage and after it
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _stack(tmp_path: Path, dataset: Path) -> Stack:
    config = StackConfig.on_free_ports(data_dir=tmp_path / "qdrant", log_dir=tmp_path / "logs",
                                       output_dir=tmp_path / "reports", cache_dir=tmp_path / "cache",
                                       allowed_roots=(dataset,))
    return Stack(config)


def _restart_evaluator(stack: Stack) -> None:
    proc = stack.processes["evaluator"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    log = (stack.config.log_dir / "evaluator.log").open("ab")
    stack.processes["evaluator"] = subprocess.Popen(stack._command("evaluator"), stdout=log, stderr=subprocess.STDOUT,
                                                    env={**os.environ, "HF_HUB_OFFLINE": "1"}, process_group=0)
    with channel(stack.config.address("evaluator")) as chan:
        wait_serving(chan, "retrieval.v1.EvaluatorService", timeout=60)


def test_an_evaluator_killed_mid_run_says_the_run_failed(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "ds", classes=10, per_class=30, seed=9)
    with _stack(tmp_path, dataset) as stack:
        for proc in stack.processes.values():
            # A process group of its own, the caller's session: in a session of its own, Linux's
            # autogroup gave each service an equal CPU share, and busy ones starved an idle one's
            # health checks for up to 250 ms (issue 9, benchmarks/load.py).
            assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0) and os.getsid(proc.pid) == os.getsid(0)
        endpoint = Endpoint(stack.config.address("evaluator"), retry=PATIENT)
        spec = evaluator_pb2.RunSpec(dataset=str(dataset), models=["efficientnet-lite0"], tsne=False)
        with EvaluatorClient(endpoint) as client:
            run_id = client.start_run(spec)
            for run in client.watch(run_id):
                if run.progress.stage == "embedding" and run.progress.done > 0:
                    break
        _restart_evaluator(stack)
        with EvaluatorClient(endpoint) as client:
            interrupted = client.run(run_id)
            assert interrupted.state == evaluator_pb2.RUN_STATE_FAILED
            assert interrupted.error.startswith("interrupted: the evaluator stopped while the run was running")
            assert list(interrupted.reports) == []
            assert not list((tmp_path / "reports").glob("*.json"))  # no report that looks complete
            # The same run started again succeeds.
            again = list(client.watch(client.start_run(spec)))[-1]
            assert again.state == evaluator_pb2.RUN_STATE_SUCCEEDED, again.error
            assert [r.id for r in client.runs()][:2] == [again.id, run_id]


def test_the_cli_follows_a_run_longer_than_the_connection_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_dataset(tmp_path / "ds", classes=10, per_class=40, seed=10)
    # The evaluator ages connections out every half second and gives calls on them 0.3 s more.
    monkeypatch.setenv("EVALUATOR_MAX_CONNECTION_AGE_SECONDS", "0.5")
    monkeypatch.setenv("EVALUATOR_MAX_CONNECTION_AGE_GRACE_SECONDS", "0.3")
    with _stack(tmp_path, dataset) as stack:
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "services.cli", "eval", "run", "--evaluator",
                               stack.config.address("evaluator"), "--dataset", str(dataset),
                               "--models", "efficientnet-lite0", "--no-tsne"],
                              cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=600)
        elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert elapsed > 2.5, f"the run took {elapsed:.1f} s: not several times the connection age and grace"
    assert "efficientnet-lite0: map 0." in done.stdout
    assert "Traceback" not in done.stderr
    # The report went where `retrieval up --output` said (the client no longer sends a directory).
    assert list((tmp_path / "reports").glob("ds__efficientnet-lite0__leave_one_out.json"))
