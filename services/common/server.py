"""gRPC server factory shared by the three services.

``create_server`` returns a started server with health checking (NOT_SERVING until the service says
it is ready), server reflection, TLS (optionally mutual) and a bearer-token check when configured,
the standard gRPC metrics on a separate Prometheus port, and the limits every service needs. Tests
start it on port 0 and talk to it through a real channel.

Threads. grpcio's synchronous server runs each RPC on a thread of a pool for the RPC's whole life,
so one shared pool lets idle streams, or a flood of callers without a token, starve everyone. Here
the RPC's *kind* picks its pool, decided in grpcio's polling thread before any worker is taken:

========================  =======================================  ==================================
kind                      pool                                     admission
========================  =======================================  ==================================
refused (no/bad token,    ``reject`` (2 threads): answers at once  none; the request is never decoded
over a limit)
health ``Check``          ``probe`` (2 threads)                    none (cheap, and kubelet needs it)
health ``Watch``          none: grpcio's non-blocking mode         ``max_watch_streams``
reflection (open, as      ``open_streams`` (4 threads)             4 at once
probes need it)
other streams             ``streams`` (``max_concurrent_streams``)  a stream that would wait is refused
unary                     ``unary`` (``grpc_workers``)              ``max_concurrent_rpcs`` running or
                                                                   waiting
========================  =======================================  ==================================

Load-shedding refusals are RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` detail (the retry
hint); the services' own "queue full" errors carry it too.

Interceptors, outermost first, one concern each over the shared ``_rewrap`` helper: watch sends
(health ``Watch`` updates written from a thread of their own, see ``_WatchSendInterceptor``), metrics (the
go-grpc-prometheus series), auth, admission (pool and limits), errors (domain errors to status
codes, undecodable requests to INVALID_ARGUMENT, a caller that went away to CANCELLED).
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import logging
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.errors import InvalidArgument, ServiceError, bounded_message, rich_status
from services.common.metrics import GrpcServerMetrics, MetricsEndpoint, rpc_type, start_metrics_endpoint
from services.common.priority import lower_thread_priority
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME
# Probes (kubelet's native gRPC probe) cannot send a token; health and reflection stay open.
_AUTH_EXEMPT = frozenset({HEALTH_SERVICE, REFLECTION_SERVICE, "grpc.reflection.v1.ServerReflection"})
# Seconds a client is told to wait before retrying a call refused for load (RetryInfo).
RETRY_AFTER_SECONDS = 0.5
_OPEN_STREAM_THREADS = 4

Behavior = Callable[..., Any]


class CountingExecutor(futures.ThreadPoolExecutor):
    """A thread pool that knows how many submitted calls have not finished (running or waiting).

    grpcio submits each admitted RPC to exactly one pool, from its polling thread; the interceptors
    read ``in_flight`` in that same thread to refuse an RPC before it would wait for a thread.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str, niceness: int = 0) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix,
                         initializer=lower_thread_priority, initargs=(niceness,))
        self.capacity = max_workers
        self._count_lock = threading.Lock()
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _done(self) -> None:
        with self._count_lock:
            self._in_flight -= 1

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._count_lock:
            self._in_flight += 1

        def run() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                self._done()

        try:
            return super().submit(run)
        except BaseException:
            self._done()
            raise


@dataclass
class _Pools:
    unary: CountingExecutor
    streams: CountingExecutor
    open_streams: CountingExecutor
    probe: futures.ThreadPoolExecutor
    reject: futures.ThreadPoolExecutor
    watch_send: futures.ThreadPoolExecutor

    @classmethod
    def for_settings(cls, settings: ServerSettings) -> _Pools:
        # The work runs below the probes' priority (services.common.priority); reflection, refusals and
        # watch sends are control plane: they stay at the probes' priority.
        return cls(unary=CountingExecutor(settings.grpc_workers, "grpc", settings.work_niceness),
                   streams=CountingExecutor(settings.max_concurrent_streams, "grpc-stream", settings.work_niceness),
                   open_streams=CountingExecutor(_OPEN_STREAM_THREADS, "grpc-open-stream"),
                   probe=futures.ThreadPoolExecutor(2, thread_name_prefix="grpc-probe"),
                   reject=futures.ThreadPoolExecutor(2, thread_name_prefix="grpc-reject"),
                   watch_send=futures.ThreadPoolExecutor(1, thread_name_prefix="grpc-watch-send"))

    def shutdown(self) -> None:
        for pool in (self.unary, self.streams, self.open_streams, self.probe, self.reject, self.watch_send):
            pool.shutdown(wait=False, cancel_futures=True)


def freeze_heap() -> None:
    """Moves every object alive now (modules, models, the engine's tables) to the garbage collector's
    permanent generation (``gc.freeze``), so that a full collection scans only what requests made.

    A full collection holds the GIL for as long as it scans: with EfficientNet-Lite0 loaded the
    encoder holds ~400k tracked objects and a full collection took 130-145 ms (measured), during which
    no thread of the process, health checks included, ran; under load that was the encoder's health
    p99. Objects frozen this way are never collected, so it is called once the service is ready (and
    after each model load), when what is alive is what the service keeps.
    """
    gc.freeze()


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
    pools: _Pools | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _frozen: bool = False

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics else None

    def set_serving(self, serving: bool) -> None:
        """Reports SERVING (or NOT_SERVING) for the server as a whole and for each service; the first
        SERVING also freezes the start-up heap (``freeze_heap``)."""
        if serving and not self._frozen:
            self._frozen = True
            freeze_heap()
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
        if self.pools is not None:
            self.pools.shutdown()
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


# -- the shared wrap helper ---------------------------------------------------------------------

_POOL_ATTRS = ("experimental_thread_pool", "experimental_non_blocking")


def _behavior(handler: grpc.RpcMethodHandler) -> Behavior:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behavior], Behavior],
            request_deserializer: Callable[[bytes], Any] | None = None,
            pool: futures.ThreadPoolExecutor | None = None) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour replaced by ``wrap(behaviour)``, the same arity and serializers.

    The pool attributes grpcio reads (``experimental_thread_pool``, ``experimental_non_blocking``)
    travel from the inner behaviour to the wrapper, unless ``pool`` sets the thread pool here.
    """
    inner = _behavior(handler)
    outer = wrap(inner)
    for attr in _POOL_ATTRS:
        if hasattr(inner, attr):
            setattr(outer, attr, getattr(inner, attr))
    if pool is not None:
        outer.experimental_thread_pool = pool  # type: ignore[attr-defined]
    kwargs = {"request_deserializer": request_deserializer or handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(outer, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(outer, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(outer, **kwargs)
    return grpc.unary_unary_rpc_method_handler(outer, **kwargs)


class _Ignored:
    """The request of a refused RPC: its bytes are never decoded."""


_IGNORED = _Ignored()


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
             pool: futures.ThreadPoolExecutor, retry_after: float | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same arity that refuses the RPC at once, on ``pool``, decoding nothing."""

    def wrap(_inner: Behavior) -> Behavior:
        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort_with_status(rich_status(code, message, retry_after))

        return refuse

    refused = _rewrap(handler, wrap, request_deserializer=lambda _data: _IGNORED, pool=pool)
    # A refusal never waits: it must not inherit non-blocking mode from the handler it replaces.
    _behavior(refused).experimental_non_blocking = False  # type: ignore[attr-defined]
    return refused


def _passthrough(inner: Behavior) -> Behavior:
    """A new function calling ``inner`` (pool attributes are set on it, never on a bound method)."""

    def call(*args: Any) -> Any:
        return inner(*args)

    return call


def _split_method(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2)
    return service, method


# -- interceptors, outermost first ----------------------------------------------------------------

class _WatchSendInterceptor(grpc.ServerInterceptor):
    """Non-blocking handlers' sends (health ``Watch``) happen on one thread of their own, in order.

    grpcio's send for a non-blocking handler blocks until grpcio's polling thread has completed the
    write, and grpcio_health's ``HealthServicer.set`` sends to every watcher while holding its lock.
    When a watcher goes away meanwhile, the polling thread runs the servicer's close callback, which
    waits for that same lock: the polling thread and ``set`` wait for each other, and the server
    hangs for good (seen in CI at shutdown; one round of 40 watches cancelled during status changes
    reproduced it). Handing each send to this thread makes ``set`` return at once; one thread keeps
    every watcher's updates in the order they were set.
    """

    def __init__(self, sender: futures.ThreadPoolExecutor) -> None:
        self._sender = sender

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not getattr(_behavior(handler), "experimental_non_blocking", False):
            return handler
        sender = self._sender

        def wrap(inner: Behavior) -> Behavior:
            def non_blocking(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> Any:
                def send_later(response: Any) -> None:
                    with contextlib.suppress(RuntimeError):  # the server is stopping: nobody to tell
                        sender.submit(_send_quietly, send, response)

                return inner(request, context, send_later)

            return non_blocking

        return _rewrap(handler, wrap)


def _send_quietly(send: Callable[[Any], None], response: Any) -> None:
    try:
        send(response)
    except Exception:  # a watcher that went away: its call is over, nothing to report
        log.debug("a health watch send failed", exc_info=True)


class _MetricsInterceptor(grpc.ServerInterceptor):
    """The go-grpc-prometheus series: started, handled by code, handling time, stream messages."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._m = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split_method(details.method)
        labels = (rpc_type(handler.request_streaming, handler.response_streaming), service, method)
        m = self._m

        def finish(start: float, code: grpc.StatusCode) -> None:
            m.handled.labels(*labels, code.name).inc()
            m.handling_seconds.labels(*labels).observe(time.perf_counter() - start)

        def counted(requests: Iterator[Any]) -> Iterator[Any]:
            for request in requests:
                m.msg_received.labels(*labels).inc()
                yield request

        def code_of(context: grpc.ServicerContext) -> grpc.StatusCode:
            return context.code() or grpc.StatusCode.OK

        def wrap(inner: Behavior) -> Behavior:
            if getattr(inner, "experimental_non_blocking", False):
                def non_blocking(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> Any:
                    start = time.perf_counter()
                    m.started.labels(*labels).inc()

                    def sent(response: Any) -> None:
                        if response is not None:
                            m.msg_sent.labels(*labels).inc()
                        send(response)

                    # A watch ends when its caller goes away: that is how go-grpc-prometheus counts it.
                    context.add_callback(lambda: finish(start, context.code() or grpc.StatusCode.CANCELLED))
                    return inner(request, context, sent)

                return non_blocking

            def call(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                m.started.labels(*labels).inc()
                if handler.request_streaming:
                    request = counted(request)
                if not handler.response_streaming:
                    try:
                        response = inner(request, context)
                    except BaseException:
                        finish(start, context.code() or grpc.StatusCode.INTERNAL)
                        raise
                    finish(start, code_of(context))
                    return response
                return stream(inner(request, context), context, start)

            return call

        def stream(responses: Iterator[Any], context: grpc.ServicerContext, start: float) -> Iterator[Any]:
            try:
                for response in responses:
                    m.msg_sent.labels(*labels).inc()
                    yield response
            except GeneratorExit:
                finish(start, grpc.StatusCode.CANCELLED)
                raise
            except BaseException:
                finish(start, context.code() or grpc.StatusCode.INTERNAL)
                raise
            finish(start, code_of(context))

        return _rewrap(handler, wrap)


class _AuthInterceptor(grpc.ServerInterceptor):
    """Refuses, on the reject pool and before decoding, RPCs without exactly one right bearer token."""

    def __init__(self, token: str, pool: futures.ThreadPoolExecutor) -> None:
        self._expected = f"Bearer {token}".encode()
        self._pool = pool

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        service, _ = _split_method(details.method)
        if service in _AUTH_EXEMPT:
            return continuation(details)
        given = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        if len(given) == 1 and hmac.compare_digest(str(given[0]).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        reason = ("more than one 'authorization' header" if len(given) > 1
                  else "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
        return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, reason, self._pool)


class _AdmissionInterceptor(grpc.ServerInterceptor):
    """Puts each RPC on the pool of its kind, refusing it (with a retry hint) when that pool is full."""

    def __init__(self, settings: ServerSettings, pools: _Pools) -> None:
        self._settings = settings
        self._pools = pools
        self._watches = 0
        self._watch_lock = threading.Lock()

    def _watch_closed(self) -> None:
        with self._watch_lock:
            self._watches -= 1

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split_method(details.method)
        pools, settings = self._pools, self._settings
        if getattr(_behavior(handler), "experimental_non_blocking", False):
            if self._watches >= settings.max_watch_streams:
                return self._busy(handler, f"{self._watches} {service}/{method} streams are open, the limit "
                                           f"is {settings.max_watch_streams}")

            def wrap_watch(inner: Behavior) -> Behavior:
                def watch(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> Any:
                    with self._watch_lock:
                        self._watches += 1
                    context.add_callback(self._watch_closed)
                    return inner(request, context, send)

                return watch

            return _rewrap(handler, wrap_watch, pool=pools.probe)
        streaming = handler.request_streaming or handler.response_streaming
        if service == HEALTH_SERVICE and not streaming:
            return _rewrap(handler, _passthrough, pool=pools.probe)
        if streaming:
            pool = pools.open_streams if service in _AUTH_EXEMPT else pools.streams
            if pool.in_flight >= pool.capacity:
                return self._busy(handler, f"{pool.in_flight} streams are open, the limit is {pool.capacity} "
                                           "(SERVER_MAX_CONCURRENT_STREAMS); close idle streams or retry later")
            return _rewrap(handler, _passthrough, pool=pool)
        if pools.unary.in_flight >= settings.max_concurrent_rpcs:
            return self._busy(handler, f"{pools.unary.in_flight} calls are in progress or waiting, the limit is "
                                       f"{settings.max_concurrent_rpcs}")
        return _rewrap(handler, _passthrough, pool=pools.unary)

    def _busy(self, handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
        return _refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {why}; retry with backoff",
                        self._pools.reject, retry_after=RETRY_AFTER_SECONDS)


class _Undecodable:
    """A request message that did not parse: the behaviour answers INVALID_ARGUMENT with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning an ``_Undecodable`` instead of raising (grpcio would say INTERNAL)."""
    if deserializer is None:
        return None
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8 in a string field...
            detail = str(exc).split(": ", 1)[-1]
            return _Undecodable(f"not a valid {type_name} ({len(data)} bytes): {detail}")

    return deserialize


class _BadMessage(InvalidArgument):
    """A request message that did not decode. An ``InvalidArgument``, so that handlers which turn
    domain errors into their own messages (an upsert stream saying what it wrote) treat it alike."""


class _ErrorsInterceptor(grpc.ServerInterceptor):
    """Maps ``ServiceError`` to its status code (with a retry hint when it has one), an undecodable
    request to INVALID_ARGUMENT, a caller that went away to CANCELLED or DEADLINE_EXCEEDED (quietly),
    and anything else to INTERNAL with a logged traceback."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        tolerant = _tolerant(handler.request_deserializer)
        if getattr(_behavior(handler), "experimental_non_blocking", False):
            # Health Watch: grpcio's own servicer, answering through a callback; only its request is ours.
            def non_blocking(inner: Behavior) -> Behavior:
                def call(request: Any, context: grpc.ServicerContext, send: Callable[[Any], None]) -> Any:
                    if isinstance(request, _Undecodable):
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is {request.reason}")
                    return inner(request, context, send)

                return call

            return _rewrap(handler, non_blocking, request_deserializer=tolerant)

        def checked(requests: Iterator[Any]) -> Iterator[Any]:
            for index, request in enumerate(requests):
                if isinstance(request, _Undecodable):
                    raise _BadMessage(f"stream message {index} is {request.reason}")
                yield request

        def wrap(inner: Behavior) -> Behavior:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    if isinstance(request, _Undecodable):
                        raise _BadMessage(f"the request is {request.reason}")
                    if handler.request_streaming:
                        request = checked(request)
                    if not handler.response_streaming:
                        return inner(request, context)
                    return stream(inner(request, context), context)
                except BaseException as exc:
                    _fail(exc, context)
                    return None  # the caller went away: nothing to send

            return call

        def stream(responses: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from responses
            except GeneratorExit:
                raise
            except BaseException as exc:
                _fail(exc, context)

        return _rewrap(handler, wrap, request_deserializer=tolerant)


def _fail(exc: BaseException, context: grpc.ServicerContext) -> None:
    """Ends the RPC for ``exc``: aborts with its status (raises), or returns when the caller is gone."""
    if not context.is_active():
        remaining = context.time_remaining()
        gone = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED)
        context.set_code(gone)  # for the metrics; the caller hears nothing more
        if isinstance(exc, grpc.RpcError):
            raise exc  # grpcio's own marker of a cancelled call: it knows not to log it
        return
    if isinstance(exc, ServiceError):
        context.abort_with_status(rich_status(exc.code, exc.message, exc.retry_after))
    existing = context.code()
    if existing is not None and existing != grpc.StatusCode.OK:
        raise exc  # the handler aborted on its own: keep its status
    if isinstance(exc, grpc.RpcError):
        raise exc  # the request stream broke under the handler; grpcio ends the call
    log.error("unhandled error in RPC", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, bounded_message(f"internal error: {type(exc).__name__}: {exc}"))


# -- the factory ------------------------------------------------------------------------------------

def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"TLS: cannot read the {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise ValueError(f"TLS: the {what} {path} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, checked first so that a bad pair says what is wrong
    (grpcio itself only reports "failed to bind"); None when TLS is off.

    Raises:
        ValueError: a file is missing or unreadable, not PEM, or the key does not match the certificate.
    """
    if not settings.tls_cert_file:
        if settings.tls_key_file or settings.tls_client_ca_file:
            raise ValueError("TLS: tls_key_file or tls_client_ca_file is set but tls_cert_file is not")
        return None
    if not settings.tls_key_file:
        raise ValueError("TLS: tls_cert_file is set but tls_key_file is not")
    cert = _read_pem(settings.tls_cert_file, "certificate")
    key = _read_pem(settings.tls_key_file, "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ValueError(f"TLS: the private key {settings.tls_key_file} does not belong to the "
                             f"certificate {settings.tls_cert_file}") from exc
        raise ValueError(f"TLS: cannot use {settings.tls_cert_file} with {settings.tls_key_file}: "
                         f"{exc.reason or exc}") from exc
    client_ca = None
    if settings.tls_client_ca_file:
        client_ca = _read_pem(settings.tls_client_ca_file, "client CA bundle")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def create_server(
    settings: ServerSettings,
    services: Sequence[ServiceRegistration],
    registry: CollectorRegistry | None = None,
) -> RunningServer:
    """Builds, binds and starts a gRPC server for ``services``; health starts NOT_SERVING.

    Args:
        settings: host, ports, message size, threads and limits, TLS, auth token.
        services: the services to register (their descriptors name them for health and metrics).
        registry: Prometheus registry for this server's metrics (a fresh one when None); the
            service's domain metrics should be registered on the same one.

    Returns:
        The running server, its bound port and, unless ``metrics_port`` is -1, its metrics endpoint.

    Raises:
        ValueError: bad TLS files (the message says which and why).
        OSError: the address cannot be bound.
    """
    credentials = server_credentials(settings)
    registry = registry if registry is not None else CollectorRegistry()
    metrics = GrpcServerMetrics(registry)
    metrics.precreate(s.descriptor for s in services)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_seconds > 0:
        # GOAWAY after this age: clients reconnect and re-resolve. Calls in flight on the old
        # connection run to their end unless a grace is set (long streams must not be cut).
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)))
        if settings.max_connection_age_grace_seconds > 0:
            options.append(("grpc.max_connection_age_grace_ms",
                            int(settings.max_connection_age_grace_seconds * 1000)))
    pools = _Pools.for_settings(settings)
    interceptors: list[grpc.ServerInterceptor] = [_WatchSendInterceptor(pools.watch_send),
                                                   _MetricsInterceptor(metrics)]
    if settings.auth_token:
        interceptors.append(_AuthInterceptor(settings.auth_token, pools.reject))
    interceptors += [_AdmissionInterceptor(settings, pools), _ErrorsInterceptor()]
    # Admission replaces grpcio's maximum_concurrent_rpcs: its refusal carries no retry hint and it
    # would count idle health watches against everyone else.
    server = grpc.server(pools.unary, interceptors=interceptors, options=options)
    for service in services:
        service.add_to_server(server)
    health_servicer = health.HealthServicer()  # Watch is non-blocking: no thread per watcher
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.descriptor.full_name for s in services]
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)

    address = f"{settings.host}:{settings.port}"
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        pools.shutdown()
        raise OSError(f"cannot bind the gRPC server to {address}: {exc} (is the port in use?)") from exc
    if port == 0:
        pools.shutdown()
        raise OSError(f"cannot bind the gRPC server to {address} (is the port in use?)")
    running = RunningServer(server=server, port=port, health=health_servicer, registry=registry,
                            service_names=names, pools=pools)
    running.set_serving(False)
    server.start()
    if settings.metrics_port >= 0:
        running.metrics = start_metrics_endpoint(settings.host, settings.metrics_port, registry)
    log.info("serving %s on %s:%d (metrics port %s)", ", ".join(names), settings.host, port,
             running.metrics_port)
    return running
