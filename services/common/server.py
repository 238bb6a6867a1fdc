"""gRPC server factory shared by the three services.

``create_server`` returns a started server with health checking (NOT_SERVING until the service says
it is ready), server reflection, TLS and a bearer-token check when configured, the standard gRPC
metrics on a separate Prometheus port, and one interceptor that maps the cores' ``ServiceError``s to
status codes. Tests start it on port 0 and talk to it through a real channel.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.errors import ServiceError
from services.common.metrics import GrpcServerMetrics, MetricsEndpoint, rpc_type, start_metrics_endpoint
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME
# Probes (kubelet's native gRPC probe) cannot send a token; health and reflection stay open.
_AUTH_EXEMPT = frozenset({HEALTH_SERVICE, REFLECTION_SERVICE, "grpc.reflection.v1.ServerReflection"})


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its descriptor and the generated ``add_*_to_server`` call."""

    descriptor: ServiceDescriptor
    add_to_server: Callable[[grpc.Server], None]


@dataclass
class RunningServer:
    """A started server and what belongs to it."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: CollectorRegistry
    service_names: list[str]
    metrics: MetricsEndpoint | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics else None

    def set_serving(self, serving: bool) -> None:
        """Reports SERVING (or NOT_SERVING) for the server as a whole and for each service."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Stops taking RPCs, lets in-flight ones finish for ``grace`` seconds, then stops metrics."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.metrics:
            self.metrics.stop()

    def wait_for_signal(self, grace: float) -> None:
        """Blocks until SIGTERM or SIGINT, then shuts down gracefully (main thread only)."""
        got = threading.Event()

        def handler(signum: int, _frame: object) -> None:
            log.info("signal %s: shutting down (grace %.1f s)", signal.Signals(signum).name, grace)
            got.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        while not got.is_set() and not self._stopped.is_set():
            got.wait(0.5)
        self.stop(grace)


def _split_method(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


class _ServerInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC, checks the bearer token, maps ServiceError to its status code."""

    def __init__(self, metrics: GrpcServerMetrics, auth_token: str | None) -> None:
        self._metrics = metrics
        self._token = f"Bearer {auth_token}".encode() if auth_token else None

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split_method(details.method)
        labels = (rpc_type(handler.request_streaming, handler.response_streaming), service, method)
        denied: str | None = None
        if self._token is not None and service not in _AUTH_EXEMPT:
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            if not hmac.compare_digest(str(given).encode(), self._token):
                denied = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
        return self._wrap(handler, labels, denied)

    def _finish(self, labels: tuple[str, str, str], start: float, code: grpc.StatusCode) -> None:
        self._metrics.handled.labels(*labels, code.name).inc()
        self._metrics.handling_seconds.labels(*labels).observe(time.perf_counter() - start)

    def _abort_for(self, exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
        """Aborts the RPC for ``exc`` (raises) unless the handler already set a status."""
        if isinstance(exc, ServiceError):
            context.abort(exc.code, exc.message)
        existing = context.code()
        if existing is not None and existing != grpc.StatusCode.OK:
            raise exc  # the handler aborted on its own: keep its status
        log.exception("unhandled error in RPC")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")  # context.abort always raises

    def _wrap(self, handler: Any, labels: tuple[str, str, str], denied: str | None) -> Any:
        m = self._metrics
        interceptor = self

        def count_requests(requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                m.msg_received.labels(*labels).inc()
                yield request

        def call_unary(behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            m.started.labels(*labels).inc()
            code = grpc.StatusCode.INTERNAL
            try:
                if denied:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    context.abort(code, denied)
                response = behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except BaseException as exc:
                code = getattr(exc, "code", None) if isinstance(exc, ServiceError) else context.code()
                code = code or grpc.StatusCode.INTERNAL
                if denied:
                    raise
                interceptor._abort_for(exc, context)
            finally:
                interceptor._finish(labels, start, code)

        def call_stream(behavior: Callable[..., Any], request: Any,
                        context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            m.started.labels(*labels).inc()
            code = grpc.StatusCode.INTERNAL
            try:
                if denied:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    context.abort(code, denied)
                for response in behavior(request, context):
                    m.msg_sent.labels(*labels).inc()
                    yield response
                code = context.code() or grpc.StatusCode.OK
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException as exc:
                code = getattr(exc, "code", None) if isinstance(exc, ServiceError) else context.code()
                code = code or grpc.StatusCode.INTERNAL
                if denied:
                    raise
                interceptor._abort_for(exc, context)
            finally:
                interceptor._finish(labels, start, code)

        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: call_unary(handler.unary_unary, req, ctx), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: call_stream(handler.unary_stream, req, ctx), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                lambda reqs, ctx: call_unary(handler.stream_unary, count_requests(reqs), ctx), **kwargs)
        return grpc.stream_stream_rpc_method_handler(
            lambda reqs, ctx: call_stream(handler.stream_stream, count_requests(reqs), ctx), **kwargs)


def create_server(
    settings: ServerSettings,
    services: Sequence[ServiceRegistration],
    registry: CollectorRegistry | None = None,
) -> RunningServer:
    """Builds, binds and starts a gRPC server for ``services``; health starts NOT_SERVING.

    Args:
        settings: host, ports, message size, workers, TLS, auth token.
        services: the services to register (their descriptors name them for health and metrics).
        registry: Prometheus registry for this server's metrics (a fresh one when None); the
            service's domain metrics should be registered on the same one.

    Returns:
        The running server, its bound port and, unless ``metrics_port`` is -1, its metrics endpoint.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    metrics.precreate(s.descriptor for s in services)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_seconds > 0:
        # GOAWAY after this age (in-flight calls get grace_seconds): clients reconnect and re-resolve.
        options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.grace_seconds * 1000))]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="grpc"),
        interceptors=[_ServerInterceptor(metrics, settings.auth_token)],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    for service in services:
        service.add_to_server(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.descriptor.full_name for s in services]
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)

    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file:
        if not settings.tls_key_file:
            raise ValueError("tls_cert_file is set but tls_key_file is not")
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    running = RunningServer(server=server, port=port, health=health_servicer, registry=registry,
                            service_names=names)
    running.set_serving(False)
    server.start()
    if settings.metrics_port >= 0:
        running.metrics = start_metrics_endpoint(settings.host, settings.metrics_port, registry)
    log.info("serving %s on %s:%d (metrics port %s)", ", ".join(names), settings.host, port,
             running.metrics_port)
    return running
