"""Prometheus metrics: the standard gRPC server metrics and the per-server metrics endpoint.

The gRPC series follow go-grpc-prometheus (the names dashboards and alerts expect):
``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}``,
``grpc_server_handling_seconds`` and the message counters, labelled by ``grpc_type``,
``grpc_service`` and ``grpc_method``. Every server has its own registry, so several servers can
run in one process (tests) without sharing series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

# Handling-time buckets in seconds: from sub-millisecond searches to minute-long streams.
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def rpc_type(client_streaming: bool, server_streaming: bool) -> str:
    """The go-grpc-prometheus ``grpc_type`` label of a method."""
    if client_streaming and server_streaming:
        return "bidi_stream"
    if client_streaming:
        return "client_stream"
    if server_streaming:
        return "server_stream"
    return "unary"


class GrpcServerMetrics:
    """The standard gRPC server metrics on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.",
                               labels, registry=registry)
        self.handled = Counter("grpc_server_handled_total", "RPCs completed on the server, by code.",
                               [*labels, "grpc_code"], registry=registry)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from RPC start to completion, in seconds.",
            labels, buckets=HANDLING_BUCKETS, registry=registry)
        self.msg_received = Counter("grpc_server_msg_received_total",
                                    "Stream messages received from clients.", labels, registry=registry)
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Stream messages sent to clients.",
                                labels, registry=registry)

    def precreate(self, services: Iterable[ServiceDescriptor]) -> None:
        """Creates every series at zero so that rates and alerts work before the first call."""
        for service in services:
            for method in service.methods:
                labels = (rpc_type(method.client_streaming, method.server_streaming),
                          service.full_name, method.name)
                self.started.labels(*labels)
                self.handling_seconds.labels(*labels)
                self.msg_received.labels(*labels)
                self.msg_sent.labels(*labels)
                for code in grpc.StatusCode:
                    self.handled.labels(*labels, code.name)


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint."""

    port: int
    server: WSGIServer
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_endpoint(host: str, port: int, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serves ``registry`` at ``http://host:port/metrics`` (port 0 picks a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(port=server.server_port, server=server, thread=thread)
