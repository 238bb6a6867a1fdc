"""Client helpers: channels with the platform's options and waiting for a server's health."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (insecure channels carry no call credentials)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
            details.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def channel(address: str, max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None) -> grpc.Channel:
    """An insecure channel to ``address`` (host:port) that accepts the platform's message sizes.

    ``dns:///`` addresses of a headless Service balance per call with round robin (servers cap
    connection age, so clients re-resolve and find pods added by scale-out). With ``token``, every
    call carries ``authorization: Bearer <token>``.
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.lb_policy_name", "round_robin")]
    chan = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(chan, _BearerToken(token)) if token else chan


def wait_serving(chan: grpc.Channel, service: str = "", timeout: float = 120.0) -> None:
    """Blocks until the server reports SERVING for ``service`` ('' = the server as a whole).

    Raises:
        TimeoutError: not SERVING within ``timeout`` seconds (the last status is in the message).
    """
    stub = health_pb2_grpc.HealthStub(chan)
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.2)
    raise TimeoutError(f"server not SERVING after {timeout:.0f} s (last: {last})")
