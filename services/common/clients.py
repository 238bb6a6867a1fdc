"""Typed clients of the platform's three services: numpy in, numpy out.

One client per service, used by the evaluator, the CLI, the web gateway, the benchmarks and the
tests, so that no stub or proto-to-numpy conversion is written twice. Every client:

- reaches its service through ``Endpoint``: address (``host:port`` or ``dns:///`` for per-call
  round robin over a headless Service), bearer token, TLS (CA bundle, client certificate for mutual
  TLS), a deadline per call and a retry policy;
- retries what may be retried, with exponential backoff: UNAVAILABLE (a restart, a broken
  connection), and RESOURCE_EXHAUSTED only when the server attached a ``google.rpc.RetryInfo`` (load
  shedding; a request that is too large is refused without one and fails at once). grpcio's own
  retry policy cannot tell those two RESOURCE_EXHAUSTEDs apart, hence this small loop;
- resumes long streams instead of failing them: ``StreamEmbedImages`` and ``Upsert`` keep a bounded
  window of unacknowledged messages and, when the stream breaks (server restart, connection ageing
  with a grace), re-send from the first unacknowledged one (both are idempotent); ``WatchRun`` is
  re-opened by run id;
- raises ``services.common.errors.ServiceError`` subclasses whose message says which service failed
  and how (``search service at 10.0.0.7:50052: NOT_FOUND: no collection named 'x'``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc, evaluator_pb2, evaluator_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.errors import Cancelled, Internal, ServiceError, Unavailable, from_rpc_error, retry_after_of
from services.common.ids import point_id

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ENCODER_SERVICE = "retrieval.v1.EncoderService"
SEARCH_SERVICE = "retrieval.v1.SearchService"
EVALUATOR_SERVICE = "retrieval.v1.EvaluatorService"

Progress = Callable[[int, int], None]
"""Called with (items done, items in total)."""

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_T = TypeVar("_T")


# -- connections ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientTLS:
    """TLS towards a service.

    Attributes:
        ca_file: PEM bundle of the CAs that sign the servers' certificates (None: the system's).
        cert_file, key_file: this client's certificate and key, for servers that require mutual TLS.
        server_name: the name to check the server's certificate against, when it differs from the
            address (e.g. connecting by IP).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None,
                   server_name: str | None = None) -> ClientTLS | None:
        """TLS settings, or None (plaintext) when no file and no server name is given."""
        if not (ca_file or cert_file or key_file or server_name):
            return None
        if bool(cert_file) != bool(key_file):
            raise ValueError("TLS: give both a client certificate and its key, or neither")
        return cls(ca_file, cert_file, key_file, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file),
                                            private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``attempts`` tries in all, waiting ``initial`` seconds, then ``multiplier``
    times longer each time, at most ``maximum`` (a server's RetryInfo delay wins when longer)."""

    attempts: int = 6
    initial: float = 0.2
    maximum: float = 5.0
    multiplier: float = 2.0

    def delay(self, failure: int, hint: float = 0.0) -> float:
        """Seconds to wait after the ``failure``-th consecutive failure (1-based)."""
        return max(hint, min(self.maximum, self.initial * self.multiplier ** (failure - 1)))


@dataclass(frozen=True)
class Endpoint:
    """Where a service is and how to talk to it.

    Attributes:
        address: ``host:port``, or ``dns:///name:port`` (every resolved address, round robin per call).
        token: bearer token sent on every call (the services' ``--auth-token``).
        tls: TLS settings; None for plaintext.
        timeout: deadline of one unary call, in seconds (streams get their own, longer budget).
        max_message_bytes: largest message sent or received.
        retry: how retryable failures are retried.
    """

    address: str
    token: str | None = None
    tls: ClientTLS | None = None
    timeout: float = 600.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a plaintext channel (grpcio refuses
    call credentials without TLS; with TLS the token travels as ``access_token_call_credentials``)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def channel(address: str, max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None,
            tls: ClientTLS | None = None) -> grpc.Channel:
    """A channel to ``address`` that accepts the platform's message sizes, balancing per call.

    ``dns:///`` addresses of a headless Service balance per call with round robin (servers cap
    connection age, so clients re-resolve and find pods added by scale-out). With ``token``, every
    call carries ``authorization: Bearer <token>``; with ``tls``, the channel is encrypted (and
    presents a client certificate when ``tls`` has one).
    """
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes),
                                      ("grpc.lb_policy_name", "round_robin")]
    if tls is None:
        chan = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(chan, _BearerToken(token)) if token else chan
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = tls.credentials()
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(address, credentials, options=options)


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


def retry_hint(error: grpc.RpcError) -> float | None:
    """Seconds to wait before retrying ``error``'s call, or None when it must not be retried."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return 0.0
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return retry_after_of(error)  # only load shedding carries a hint
    return None


class _Client:
    """A channel to one service, health waiting, retries and error conversion."""

    service = ""
    name = ""

    def __init__(self, endpoint: Endpoint | str) -> None:
        self.endpoint = Endpoint(endpoint) if isinstance(endpoint, str) else endpoint
        e = self.endpoint
        self.channel = channel(e.address, e.max_message_bytes, e.token, e.tls)

    @property
    def where(self) -> str:
        return f"{self.name} at {self.endpoint.address}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Blocks until the service reports SERVING; Unavailable (retryable) otherwise."""
        try:
            wait_serving(self.channel, self.service, timeout=timeout)
        except TimeoutError as exc:
            raise Unavailable(f"{self.where} is not serving: {exc}") from exc

    def _call(self, fn: Callable[[], _T], idempotent: bool = True) -> _T:
        """``fn()`` (one gRPC call), retried by the endpoint's policy; a final failure as a ``ServiceError``.

        A call that is not ``idempotent`` is retried only when the server refused it for load before
        doing anything (RESOURCE_EXHAUSTED with a retry hint), never after UNAVAILABLE, which may
        come after the work was done (grpcio itself retries calls that never left the client).
        """
        policy = self.endpoint.retry
        failure = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                failure += 1
                hint = retry_hint(exc)
                if not idempotent and exc.code() == grpc.StatusCode.UNAVAILABLE:
                    hint = None
                if hint is None or failure >= policy.attempts:
                    raise from_rpc_error(exc, self.where) from None
                delay = policy.delay(failure, hint)
                log.info("%s: %s; retry %d in %.1f s", self.where, exc.code().name, failure, delay)
                time.sleep(delay)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_C = TypeVar("_C", bound=_Client)


# -- resumable bidirectional streams --------------------------------------------------------------

class _ResumableStream(Generic[_Req, _Resp]):
    """Drives a bidirectional stream whose server answers each request message once, in order.

    At most ``window`` messages are unacknowledged at a time (so a cancelled or broken stream never
    leaves more than that much work behind); when the stream breaks with a retryable error, a new
    one re-sends the unacknowledged messages, then goes on. The messages must be idempotent.
    """

    def __init__(self, client: _Client, open_call: Callable[[Iterator[_Req]], Any], messages: Iterable[_Req],
                 on_ack: Callable[[_Req, _Resp], None], window: int, cancelled: threading.Event | None) -> None:
        self._client = client
        self._open = open_call
        self._source = iter(messages)
        self._on_ack = on_ack
        self._window = max(1, window)
        self._cancelled = cancelled or threading.Event()
        self._lock = threading.Lock()
        self._unacked: deque[_Req] = deque()
        self._generation = 0
        self._source_error: BaseException | None = None

    def _requests(self, generation: int, resend: list[_Req], slots: threading.Semaphore,
                  stop: threading.Event) -> Iterator[_Req]:
        for message in resend:
            slots.acquire()
            yield message
        while True:
            while not slots.acquire(timeout=0.1):
                if stop.is_set() or self._cancelled.is_set():
                    return
            if stop.is_set() or self._cancelled.is_set():
                return
            with self._lock:
                if generation != self._generation:
                    return  # a newer stream took over
                try:
                    message = next(self._source)
                except StopIteration:
                    return
                except BaseException as exc:  # reading the input failed: surfaces in run()
                    self._source_error = exc
                    stop.set()
                    return
                self._unacked.append(message)
            yield message

    def run(self) -> None:
        policy = self._client.endpoint.retry
        failure = 0
        while True:
            with self._lock:
                self._generation += 1
                generation, resend = self._generation, list(self._unacked)
            slots, stop, done = threading.Semaphore(self._window), threading.Event(), threading.Event()
            call = self._open(self._requests(generation, resend, slots, stop))
            watcher = threading.Thread(target=self._cancel_when_asked, args=(call, done), daemon=True)
            watcher.start()
            try:
                for response in call:
                    with self._lock:
                        if not self._unacked:
                            raise Internal(f"{self._client.where} acknowledged more messages than were sent")
                        message = self._unacked.popleft()
                    slots.release()
                    self._on_ack(message, response)
                    failure = 0
                if self._source_error is not None:
                    raise self._source_error
                if self._cancelled.is_set():
                    raise Cancelled("cancelled")
                with self._lock:
                    if self._unacked:
                        raise Internal(f"{self._client.where} ended the stream with {len(self._unacked)} "
                                       "messages unacknowledged")
                return
            except grpc.RpcError as exc:
                if self._source_error is not None:
                    raise self._source_error from None
                if self._cancelled.is_set():
                    raise Cancelled("cancelled") from None
                failure += 1
                hint = retry_hint(exc)
                if hint is None or failure >= policy.attempts:
                    raise from_rpc_error(exc, self._client.where) from None
                delay = policy.delay(failure, hint)
                log.warning("%s: stream broke (%s: %s); resuming %d unacknowledged messages in %.1f s",
                            self._client.where, exc.code().name, exc.details(), len(self._unacked), delay)
                time.sleep(delay)
            finally:
                stop.set()
                done.set()

    def _cancel_when_asked(self, call: Any, done: threading.Event) -> None:
        while not done.wait(0.05):
            if self._cancelled.is_set():
                call.cancel()
                return


# -- encoder --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ItemError:
    """Why one item of a batch was not embedded: its gRPC status code and the server's message."""

    code: grpc.StatusCode
    message: str


_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class Embeddings:
    """The result of embedding n items with one model.

    Attributes:
        model: the model id that produced the vectors.
        dim: embedding dimension.
        vectors: float32 (n, dim), L2-normalised rows in request order; the rows of failed items are NaN.
        errors: item index -> why it failed.
    """

    model: str
    dim: int
    vectors: np.ndarray
    errors: dict[int, ItemError]

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask (n,) of the items that have a vector."""
        mask = np.ones(len(self.vectors), dtype=bool)
        mask[list(self.errors)] = False
        return mask


class _EmbeddingsBuilder:
    """Collects ``ItemResult``s (ids are item indices) into ``Embeddings``."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.model = ""
        self.dim = 0
        self.vectors: np.ndarray | None = None
        self.errors: dict[int, ItemError] = {}
        self.done = 0

    def add(self, model: str, dim: int, results: Iterable[Any], offset: int = 0) -> None:
        if self.vectors is None:
            self.model, self.dim = model, dim
            self.vectors = np.full((self.count, dim), np.nan, dtype=np.float32)
        for i, result in enumerate(results):
            index = offset + i
            if result.WhichOneof("result") == "vector":
                self.vectors[index] = np.asarray(result.vector.values, dtype=np.float32)
            else:
                self.errors[index] = ItemError(_CODE_BY_VALUE.get(result.error.code, grpc.StatusCode.UNKNOWN),
                                               result.error.message)
            self.done += 1

    def build(self) -> Embeddings:
        vectors = self.vectors if self.vectors is not None else np.zeros((self.count, 0), dtype=np.float32)
        return Embeddings(self.model, self.dim, vectors, self.errors)


class EncoderClient(_Client):
    """``retrieval.v1.EncoderService``: images and texts to L2-normalised float32 vectors."""

    service = ENCODER_SERVICE
    name = "encoder service"

    def __init__(self, endpoint: Endpoint | str) -> None:
        super().__init__(endpoint)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)

    def model(self, model_id: str = "") -> encoder_pb2.ModelInfo:
        """The model's description ('' is the server's default model)."""
        request = encoder_pb2.GetModelRequest(model=model_id)
        return self._call(lambda: self.stub.GetModel(request, timeout=self.endpoint.timeout).model)

    def models(self) -> list[encoder_pb2.ModelInfo]:
        return list(self._call(lambda: self.stub.ListModels(encoder_pb2.ListModelsRequest(),
                                                            timeout=self.endpoint.timeout).models))

    def embed_images(self, images: Sequence[bytes], model: str = "") -> Embeddings:
        """Embeds encoded images in one call; a bad image fails on its own (``Embeddings.errors``)."""
        request = encoder_pb2.EmbedImagesRequest(model=model, images=[encoder_pb2.Image(data=d, id=str(i))
                                                                      for i, d in enumerate(images)])
        response = self._call(lambda: self.stub.EmbedImages(request, timeout=self.endpoint.timeout))
        built = _EmbeddingsBuilder(len(images))
        built.add(response.model, response.dim, response.results)
        return built.build()

    def embed_texts(self, texts: Sequence[str], model: str = "") -> Embeddings:
        """Embeds texts with a model's text tower (e.g. "a photo of a cat")."""
        request = encoder_pb2.EmbedTextsRequest(model=model, texts=list(texts))
        response = self._call(lambda: self.stub.EmbedTexts(request, timeout=self.endpoint.timeout))
        built = _EmbeddingsBuilder(len(texts))
        built.add(response.model, response.dim, response.results)
        return built.build()

    def embed_stream(self, images: Iterable[bytes], count: int, model: str = "", batch: int = 32, window: int = 8,
                     progress: Progress | None = None, cancelled: threading.Event | None = None) -> Embeddings:
        """Embeds ``count`` images read lazily from ``images`` over ``StreamEmbedImages``.

        ``batch`` images per message, at most ``window`` messages unacknowledged (the server pipelines
        them); a broken stream resumes from the first unacknowledged message; ``cancelled`` stops it
        within one window and raises ``Cancelled``.
        """
        built = _EmbeddingsBuilder(count)

        def messages() -> Iterator[tuple[int, encoder_pb2.StreamEmbedImagesRequest]]:
            chunk: list[encoder_pb2.Image] = []
            start = 0
            for index, data in enumerate(images):
                chunk.append(encoder_pb2.Image(data=data, id=str(index)))
                if len(chunk) == batch:
                    yield start, encoder_pb2.StreamEmbedImagesRequest(model=model, images=chunk)
                    start, chunk = index + 1, []
            if chunk:
                yield start, encoder_pb2.StreamEmbedImagesRequest(model=model, images=chunk)

        def ack(message: tuple[int, encoder_pb2.StreamEmbedImagesRequest],
                response: encoder_pb2.StreamEmbedImagesResponse) -> None:
            built.add(response.model, response.dim, response.results, offset=message[0])
            if progress is not None:
                progress(built.done, count)

        budget = self.endpoint.timeout * max(1.0, count / 1000)

        def open_call(requests: Iterator[tuple[int, encoder_pb2.StreamEmbedImagesRequest]]) -> Any:
            # The stream keeps (offset, message) pairs for its bookkeeping; the stub sends the messages.
            return self.stub.StreamEmbedImages((m for _, m in requests), timeout=budget)

        _ResumableStream(self, open_call, messages(), ack, window, cancelled).run()
        return built.build()

    def embed_files(self, root: Path, paths: Sequence[str], model: str = "", batch: int = 32, window: int = 8,
                    progress: Progress | None = None, cancelled: threading.Event | None = None) -> Embeddings:
        """Embeds the files ``root / path`` (read lazily); an unreadable file is an item error."""

        def read() -> Iterator[bytes]:
            for path in paths:
                try:
                    yield (root / path).read_bytes()
                except OSError:
                    yield b""  # the encoder reports it as an empty image, with its index

        return self.embed_stream(read(), len(paths), model, batch, window, progress, cancelled)


# -- search ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """One search result: point id, cosine similarity, and the payload/vector when asked for."""

    id: str
    score: float
    dataset: str = ""
    path: str = ""
    labels: tuple[str, ...] = ()
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchFilter:
    """Payload conditions; all given ones must hold (see ``retrieval.v1.Filter``)."""

    labels_any: tuple[str, ...] = ()
    dataset: str = ""
    path_prefix: str = ""

    def message(self) -> search_pb2.Filter | None:
        if not (self.labels_any or self.dataset or self.path_prefix):
            return None
        return search_pb2.Filter(labels_any=list(self.labels_any), dataset=self.dataset,
                                 path_prefix=self.path_prefix)


@dataclass(frozen=True)
class QueryPart:
    """One part of a composed query (``retrieval.v1.QueryPart``): a vector (e.g. an image's or a text's
    embedding) or a stored point's own vector, with its weight. The search service queries with
    normalise(sum of weight * normalise(part)) and leaves stored parts out of the hits."""

    weight: float
    vector: np.ndarray | None = None
    point_id: str = ""

    def message(self) -> search_pb2.QueryPart:
        values = [] if self.vector is None else np.asarray(self.vector, dtype=np.float32).tolist()
        return search_pb2.QueryPart(vector=values, point_id=self.point_id, weight=self.weight)


@dataclass(frozen=True)
class TopK:
    """The top-k of many queries as arrays.

    Attributes:
        ids: per query, the hit ids best first (fewer than k when the collection is smaller).
        scores: float32 (n, k) cosine similarities, NaN where a query has fewer hits.
    """

    ids: list[list[str]]
    scores: np.ndarray


def _hits(response: search_pb2.SearchResponse) -> list[Hit]:
    return [Hit(h.id, h.score, h.payload.dataset, h.payload.path, tuple(h.payload.labels),
                np.asarray(h.vector, dtype=np.float32) if len(h.vector) else None) for h in response.hits]


def upsert_messages(collection: str, points: Iterable[search_pb2.Point], max_bytes: int = 4 * 1024 * 1024,
                    max_points: int = 1024) -> Iterator[search_pb2.UpsertRequest]:
    """Splits ``points`` into UpsertRequest messages of at most ``max_bytes`` and ``max_points`` each.

    Every message names the collection (so any message can open a resumed stream). Keep both limits
    at or below the service's ``max_upsert_bytes`` / ``max_upsert_points`` (defaults 16 MiB / 4096).
    """
    header = len(collection) + 8
    batch: list[search_pb2.Point] = []
    size = header
    for point in points:
        point_size = point.ByteSize() + 6  # field tag and length prefix, at most
        if batch and (size + point_size > max_bytes or len(batch) >= max_points):
            yield search_pb2.UpsertRequest(collection=collection, points=batch)
            batch, size = [], header
        batch.append(point)
        size += point_size
    if batch:
        yield search_pb2.UpsertRequest(collection=collection, points=batch)


def point_message(vector: np.ndarray, dataset: str, path: str, labels: Sequence[str] = (),
                  point_id: str = "") -> search_pb2.Point:
    """A Point; with ``point_id`` empty the service derives the id from (dataset, path)."""
    return search_pb2.Point(id=point_id, vector=np.asarray(vector, dtype=np.float32).tolist(),
                            payload=search_pb2.Payload(dataset=dataset, path=path, labels=list(labels)))


@dataclass(frozen=True)
class UpsertSummary:
    """What an upsert acknowledged: distinct points written per message, summed, and the point ids
    of the points sent (derived from dataset and path, in the order given)."""

    upserted: int
    ids: list[str]


class SearchClient(_Client):
    """``retrieval.v1.SearchService``: collections, upserts and k-NN queries over numpy vectors."""

    service = SEARCH_SERVICE
    name = "search service"

    def __init__(self, endpoint: Endpoint | str) -> None:
        super().__init__(endpoint)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    # collections
    def create_collection(self, name: str, dim: int, model: str = "", dataset: str = "",
                          exist_ok: bool = False, exact_only: bool = False) -> search_pb2.CollectionInfo:
        request = search_pb2.CreateCollectionRequest(name=name, dim=dim, model=model, dataset=dataset,
                                                     exist_ok=exist_ok, exact_only=exact_only)
        # Retried after UNAVAILABLE only with exist_ok: otherwise a lost answer would come back ALREADY_EXISTS.
        return self._call(lambda: self.stub.CreateCollection(request, timeout=self.endpoint.timeout).collection,
                          idempotent=exist_ok)

    def recreate_collection(self, name: str, dim: int, model: str = "", dataset: str = "",
                            exact_only: bool = False) -> None:
        """A fresh, empty collection (an earlier one of the same name is dropped)."""
        self.delete_collection(name, missing_ok=True)
        self.create_collection(name, dim, model, dataset, exact_only=exact_only)

    def delete_collection(self, name: str, missing_ok: bool = False) -> bool:
        """Deletes a collection; False when it did not exist and ``missing_ok``."""
        request = search_pb2.DeleteCollectionRequest(name=name)
        try:
            self._call(lambda: self.stub.DeleteCollection(request, timeout=self.endpoint.timeout))
        except ServiceError as exc:
            if missing_ok and exc.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    def collection(self, name: str) -> search_pb2.CollectionInfo:
        request = search_pb2.GetCollectionRequest(name=name)
        return self._call(lambda: self.stub.GetCollection(request, timeout=self.endpoint.timeout).collection)

    def collections(self) -> list[search_pb2.CollectionInfo]:
        return list(self._call(lambda: self.stub.ListCollections(search_pb2.ListCollectionsRequest(),
                                                                 timeout=self.endpoint.timeout).collections))

    def count(self, collection: str, filter: SearchFilter | None = None) -> int:
        request = search_pb2.CountRequest(collection=collection, filter=filter.message() if filter else None)
        return int(self._call(lambda: self.stub.Count(request, timeout=self.endpoint.timeout).count))

    # writes
    def upsert_stream(self, messages: Iterable[search_pb2.UpsertRequest], window: int = 4,
                      progress: Callable[[int], None] | None = None,
                      cancelled: threading.Event | None = None) -> int:
        """Sends UpsertRequest messages (each naming its collection), resuming a broken stream from
        the first unacknowledged message; returns the distinct points acknowledged, summed."""
        total = [0]

        def ack(_message: search_pb2.UpsertRequest, response: search_pb2.UpsertResponse) -> None:
            total[0] += int(response.upserted)
            if progress is not None:
                progress(total[0])

        stream: _ResumableStream[search_pb2.UpsertRequest, search_pb2.UpsertResponse] = _ResumableStream(
            self, lambda reqs: self.stub.Upsert(reqs, timeout=self.endpoint.timeout), messages, ack, window,
            cancelled)
        stream.run()
        return total[0]

    def upsert(self, collection: str, dataset: str, paths: Sequence[str], labels: Sequence[Sequence[str]],
               vectors: np.ndarray, batch: int = 256, progress: Progress | None = None,
               cancelled: threading.Event | None = None) -> UpsertSummary:
        """Stores ``vectors`` (n, dim) with payloads (dataset, paths[i], labels[i]); ids derive from
        (dataset, path). Returns what was acknowledged and the ids, in the order of ``paths``."""
        if len(paths) != len(vectors) or len(labels) != len(vectors):
            raise ValueError(f"upsert: {len(vectors)} vectors, {len(paths)} paths, {len(labels)} label lists")
        points = (point_message(vectors[i], dataset, paths[i], labels[i]) for i in range(len(paths)))
        upserted = self.upsert_stream(
            upsert_messages(collection, points, max_points=batch), cancelled=cancelled,
            progress=(lambda done: progress(min(done, len(paths)), len(paths))) if progress else None)
        return UpsertSummary(upserted, [point_id(dataset, p) for p in paths])

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        request = search_pb2.DeleteRequest(collection=collection, ids=list(ids))
        return int(self._call(lambda: self.stub.Delete(request, timeout=self.endpoint.timeout).deleted))

    # reads
    def search(self, collection: str, vector: np.ndarray, limit: int, filter: SearchFilter | None = None,
               exclude_ids: Sequence[str] = (), exact: bool = False, with_payload: bool = True,
               with_vector: bool = False) -> list[Hit]:
        """The ``limit`` nearest points to ``vector`` (cosine), best first."""
        request = search_pb2.SearchRequest(
            collection=collection, vector=np.asarray(vector, dtype=np.float32).tolist(), limit=limit,
            filter=filter.message() if filter else None, exclude_ids=list(exclude_ids), exact=exact,
            with_payload=with_payload, with_vector=with_vector)
        return _hits(self._call(lambda: self.stub.Search(request, timeout=self.endpoint.timeout)))

    def search_composed(self, collection: str, parts: Sequence[QueryPart], limit: int,
                        filter: SearchFilter | None = None, exact: bool = False,
                        with_payload: bool = True) -> list[Hit]:
        """The ``limit`` nearest points to a composed query (e.g. an image and a text modifier)."""
        request = search_pb2.SearchRequest(collection=collection, composed=[p.message() for p in parts], limit=limit,
                                           filter=filter.message() if filter else None, exact=exact,
                                           with_payload=with_payload)
        return _hits(self._call(lambda: self.stub.Search(request, timeout=self.endpoint.timeout)))

    def search_by_id(self, collection: str, pid: str, limit: int, filter: SearchFilter | None = None,
                     exact: bool = False, with_payload: bool = True, with_vector: bool = False) -> list[Hit]:
        """The ``limit`` nearest points to stored point ``pid``'s own vector, itself excluded."""
        request = search_pb2.SearchByIdRequest(collection=collection, id=pid, limit=limit,
                                               filter=filter.message() if filter else None, exact=exact,
                                               with_payload=with_payload, with_vector=with_vector)
        return _hits(self._call(lambda: self.stub.SearchById(request, timeout=self.endpoint.timeout)))

    def search_batch(self, collection: str, limit: int, vectors: np.ndarray | None = None,
                     point_ids: Sequence[str] | None = None, exact: bool = False, with_payload: bool = True,
                     batch: int = 256, progress: Progress | None = None) -> list[list[Hit]]:
        """Top-``limit`` hits of many queries, ``batch`` per ``SearchBatch`` call: query vectors
        (n, dim), or stored point ids (each point queries with its own vector, itself excluded)."""
        requests = self._batch_requests(collection, limit, vectors, point_ids, exact, with_payload)
        out: list[list[Hit]] = []
        for start in range(0, len(requests), batch):
            chunk = search_pb2.SearchBatchRequest(queries=requests[start:start + batch])
            response = self._call(partial(self.stub.SearchBatch, chunk, timeout=self.endpoint.timeout))
            out += [_hits(r) for r in response.results]
            if progress is not None:
                progress(len(out), len(requests))
        return out

    def top_k(self, collection: str, k: int, vectors: np.ndarray | None = None,
              point_ids: Sequence[str] | None = None, exact: bool = True, batch: int = 256, in_flight: int = 2,
              progress: Progress | None = None, composed: Sequence[Sequence[QueryPart]] | None = None) -> TopK:
        """``search_batch`` without payloads, as arrays (for evaluation); ``in_flight`` batches at a
        time, so that the service computes one while this process reads the other. The queries are
        vectors, stored point ids, or composed queries (one list of parts per query)."""
        if composed is not None:
            if vectors is not None or point_ids is not None:
                raise ValueError("give query vectors, point ids or composed queries, one of them")
            requests = [search_pb2.SearchRequest(collection=collection, composed=[p.message() for p in parts],
                                                 limit=k, exact=exact, with_payload=False) for parts in composed]
        else:
            requests = self._batch_requests(collection, k, vectors, point_ids, exact, with_payload=False)
        ids: list[list[str]] = [[] for _ in requests]
        scores = np.full((len(requests), k), np.nan, dtype=np.float32)
        starts = list(range(0, len(requests), batch))

        def fetch(start: int) -> search_pb2.SearchBatchResponse:
            chunk = search_pb2.SearchBatchRequest(queries=requests[start:start + batch])
            return self._call(partial(self.stub.SearchBatch, chunk, timeout=self.endpoint.timeout))

        done = 0
        with ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="top-k") as pool:
            for start, response in zip(starts, pool.map(fetch, starts), strict=True):
                for row, result in enumerate(response.results, start=start):
                    hits = result.hits
                    ids[row] = [h.id for h in hits]
                    scores[row, : len(hits)] = [h.score for h in hits]
                done += len(response.results)
                if progress is not None:
                    progress(done, len(requests))
        return TopK(ids, scores)

    @staticmethod
    def _batch_requests(collection: str, limit: int, vectors: np.ndarray | None, point_ids: Sequence[str] | None,
                        exact: bool, with_payload: bool) -> list[search_pb2.SearchRequest]:
        if (vectors is None) == (point_ids is None):
            raise ValueError("give query vectors or point ids, not both")
        if vectors is not None:
            return [search_pb2.SearchRequest(collection=collection, vector=v.tolist(), limit=limit, exact=exact,
                                             with_payload=with_payload)
                    for v in np.asarray(vectors, dtype=np.float32)]
        return [search_pb2.SearchRequest(collection=collection, query_point_id=pid, limit=limit, exact=exact,
                                         with_payload=with_payload) for pid in point_ids or ()]

    def scroll(self, collection: str, filter: SearchFilter | None = None, page: int = 256,
               with_vector: bool = False) -> Iterator[search_pb2.Point]:
        """Every point (matching ``filter``) in id order, page by page."""
        offset = ""
        while True:
            request = search_pb2.ScrollRequest(collection=collection, filter=filter.message() if filter else None,
                                               limit=page, offset=offset, with_vector=with_vector)
            response = self._call(partial(self.stub.Scroll, request, timeout=self.endpoint.timeout))
            yield from response.points
            if not response.next_offset:
                return
            offset = response.next_offset


# -- evaluator ------------------------------------------------------------------------------------

TERMINAL_RUN_STATES = frozenset({evaluator_pb2.RUN_STATE_SUCCEEDED, evaluator_pb2.RUN_STATE_FAILED,
                                 evaluator_pb2.RUN_STATE_CANCELLED})


class EvaluatorClient(_Client):
    """``retrieval.v1.EvaluatorService``: start, follow, list and cancel benchmark runs."""

    service = EVALUATOR_SERVICE
    name = "evaluator service"

    def __init__(self, endpoint: Endpoint | str) -> None:
        super().__init__(endpoint)
        self.stub = evaluator_pb2_grpc.EvaluatorServiceStub(self.channel)

    def start_run(self, spec: evaluator_pb2.RunSpec) -> str:
        """Queues a run; returns its id. Not retried (a lost answer could start it twice) except on a
        load-shedding refusal, which the server gives before doing anything."""
        request = evaluator_pb2.StartRunRequest(spec=spec)
        return self._call(lambda: self.stub.StartRun(request, timeout=self.endpoint.timeout).run_id,
                          idempotent=False)

    def run(self, run_id: str) -> evaluator_pb2.Run:
        request = evaluator_pb2.GetRunRequest(run_id=run_id)
        return self._call(lambda: self.stub.GetRun(request, timeout=self.endpoint.timeout).run)

    def cancel(self, run_id: str) -> evaluator_pb2.Run:
        request = evaluator_pb2.CancelRunRequest(run_id=run_id)
        return self._call(lambda: self.stub.CancelRun(request, timeout=self.endpoint.timeout).run)

    def runs(self, page_size: int = 100) -> Iterator[evaluator_pb2.Run]:
        """Every run the server keeps, newest first, page by page."""
        token = ""
        while True:
            request = evaluator_pb2.ListRunsRequest(page_size=page_size, page_token=token)
            response = self._call(partial(self.stub.ListRuns, request, timeout=self.endpoint.timeout))
            yield from response.runs
            if not response.next_page_token:
                return
            token = response.next_page_token

    def watch(self, run_id: str) -> Iterator[evaluator_pb2.Run]:
        """The run now and after every change, until it ends. A stream cut by the server (connection
        ageing, restart) is re-opened by run id, however long the run takes."""
        policy = self.endpoint.retry
        failure = 0
        while True:
            try:
                for response in self.stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id)):
                    failure = 0
                    yield response.run
                    if response.run.state in TERMINAL_RUN_STATES:
                        return
                # The server ended the stream before the run ended (shutting down): watch again.
                failure += 1
                if failure >= policy.attempts:
                    raise Unavailable(f"{self.where}: WatchRun({run_id}) keeps ending before the run does")
                time.sleep(policy.delay(failure))
            except grpc.RpcError as exc:
                failure += 1
                hint = retry_hint(exc)
                if hint is None or failure >= policy.attempts:
                    raise from_rpc_error(exc, self.where) from None
                log.info("%s: watch of run %s broke (%s); watching again", self.where, run_id, exc.code().name)
                time.sleep(policy.delay(failure, hint))
