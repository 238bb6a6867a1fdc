"""Client helpers: channels with the platform's options and waiting for a server's health."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel(address: str, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """An insecure channel to ``address`` (host:port) that accepts the platform's message sizes.

    ``dns:///`` addresses of a headless Service balance per call with round robin.
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.lb_policy_name", "round_robin")]
    return grpc.insecure_channel(address, options=options)


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
