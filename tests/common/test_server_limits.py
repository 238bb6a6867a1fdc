"""The shared server under hostile load: idle streams, watchers, floods without a token, limits.

Each test failed on the server before its pools and admission existed (issue 9, defect 4): there,
every RPC (refusals and health checks included) waited for one of ``grpc_workers`` threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.errors import retry_after_of
from services.common.server import RETRY_AFTER_SECONDS, RunningServer
from services.common.settings import ServerSettings
from tests.common.conftest import FakeEncoder, serve_fake

TOKEN = [("authorization", "Bearer s3cret")]


def _address(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


def _idle_requests(stop: threading.Event) -> Iterator[encoder_pb2.StreamEmbedImagesRequest]:
    stop.wait(30)
    return
    yield  # a generator that sends nothing until stopped


def test_idle_streams_never_take_the_unary_threads(
        fake_server: tuple[RunningServer, FakeEncoder, ServerSettings]) -> None:
    running, _, settings = fake_server
    stop = threading.Event()
    with grpc.insecure_channel(_address(running)) as chan:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        streams = [stub.StreamEmbedImages(_idle_requests(stop), metadata=TOKEN) for _ in range(8)]
        try:
            time.sleep(0.5)
            start = time.monotonic()
            stub.ListModels(encoder_pb2.ListModelsRequest(), metadata=TOKEN, timeout=2)
            health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - start < 1.0
            # Streams beyond the limit were refused at once, with a retry hint; the others stay open.
            refused = []
            for call in streams:
                if call.done():
                    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
                    assert "streams are open" in call.details()
                    refused.append(retry_after_of(call))
            assert len(refused) == 8 - settings.max_concurrent_streams
            assert refused == [RETRY_AFTER_SECONDS] * len(refused)
        finally:
            stop.set()
            for call in streams:
                call.cancel()


def test_health_watchers_hold_no_thread(fake_server: tuple[RunningServer, FakeEncoder, ServerSettings]) -> None:
    running, _, settings = fake_server
    with grpc.insecure_channel(_address(running)) as chan:  # watchers need no token, like probes
        health = health_pb2_grpc.HealthStub(chan)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(5 * settings.grpc_workers)]
        try:
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stub = encoder_pb2_grpc.EncoderServiceStub(chan)
            stub.ListModels(encoder_pb2.ListModelsRequest(), metadata=TOKEN, timeout=2)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                health_pb2.HealthCheckResponse.SERVING
            running.set_serving(False)  # ...and they still hear about changes
            assert next(watches[-1]).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            for watch in watches:
                watch.cancel()


def _flip(running: RunningServer, times: int) -> None:
    for i in range(times):
        running.set_serving(i % 2 == 0)


def test_status_changes_while_watchers_leave_never_hang_the_server() -> None:
    # grpcio_health sends to watchers under its lock and grpcio's send waited for the polling thread,
    # which needed that lock for a leaving watcher's close callback: set_serving and stop hung for
    # good (CI, at shutdown). Each round: 40 watchers leave while the status flips 200 times.
    for _ in range(5):
        served = serve_fake(ServerSettings(port=0, metrics_port=-1))
        running, _, _ = next(served)
        with grpc.insecure_channel(_address(running)) as chan:
            health = health_pb2_grpc.HealthStub(chan)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(40)]
            for watch in watches:
                next(watch)
            flips = threading.Thread(target=_flip, args=(running, 200), daemon=True)
            flips.start()
            for watch in watches:
                watch.cancel()
            flips.join(10)
            assert not flips.is_alive(), "set_serving hung while watchers left"
        stopping = threading.Thread(target=next, args=(served, None), daemon=True)  # the fixture's stop(0)
        stopping.start()
        stopping.join(10)
        assert not stopping.is_alive(), "stop hung"


def _occupy_unary_threads(stub: encoder_pb2_grpc.EncoderServiceStub, fake: FakeEncoder,
                          count: int) -> list[grpc.Future]:
    calls = [stub.GetModel.future(encoder_pb2.GetModelRequest(model=str(i)), metadata=TOKEN, timeout=30)
             for i in range(count)]
    for _ in range(count):
        assert fake.entered.acquire(timeout=10), "the blocking calls did not start"
    return calls


def test_callers_without_a_token_and_probes_never_wait_for_a_worker(
        fake_server: tuple[RunningServer, FakeEncoder, ServerSettings]) -> None:
    running, fake, settings = fake_server
    with grpc.insecure_channel(_address(running)) as chan:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        busy = _occupy_unary_threads(stub, fake, settings.grpc_workers)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(encoder_pb2.ListModelsRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - start < 1.0
        fake.release.set()
        assert [c.result().model.id for c in busy] == [str(i) for i in range(settings.grpc_workers)]


def test_calls_beyond_the_limit_are_refused_with_a_retry_hint(
        fake_server: tuple[RunningServer, FakeEncoder, ServerSettings]) -> None:
    running, fake, settings = fake_server
    with grpc.insecure_channel(_address(running)) as chan:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        busy = _occupy_unary_threads(stub, fake, settings.grpc_workers)
        waiting = [stub.ListModels.future(encoder_pb2.ListModelsRequest(), metadata=TOKEN, timeout=30)
                   for _ in range(settings.max_concurrent_rpcs - settings.grpc_workers)]
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(encoder_pb2.ListModelsRequest(), metadata=TOKEN, timeout=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry with backoff" in err.value.details()
        assert retry_after_of(err.value) == RETRY_AFTER_SECONDS
        fake.release.set()
        for call in busy + waiting:
            call.result()  # the admitted ones all complete


def test_domain_errors_carry_their_retry_hint(fake_server: tuple[RunningServer, FakeEncoder, ServerSettings]) -> None:
    running, _, _ = fake_server
    with grpc.insecure_channel(_address(running)) as chan, pytest.raises(grpc.RpcError) as err:
        encoder_pb2_grpc.EncoderServiceStub(chan).EmbedTexts(encoder_pb2.EmbedTextsRequest(), metadata=TOKEN)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == "queue full"
    assert retry_after_of(err.value) == 1.5
