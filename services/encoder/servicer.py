"""gRPC servicer of ``retrieval.v1.EncoderService``: converts messages, the core does the work."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

import grpc
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry
from retrieval.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

from services.common.errors import ServiceError, rpc_code_value
from services.common.server import RunningServer, ServiceRegistration, create_server
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore, ModelDescription, ModelRuntime, Outcome, cancel_all, collect
from services.encoder.registry import IMAGE, TEXT, Registry

log = logging.getLogger(__name__)

_MODALITY = {IMAGE: common_pb2.MODALITY_IMAGE, TEXT: common_pb2.MODALITY_TEXT}
SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]
# StreamEmbedImages keeps this many request messages in flight (decoding/queued) per stream.
STREAM_WINDOW = 8
# What the stream reader hands the writer: a submitted request, the error that ended it, or the end.
_StreamEntry = tuple[ModelRuntime, list[str], list[Future[Outcome]]] | BaseException | None


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The RPC's deadline as a ``time.monotonic()`` time (None when the client set none)."""
    remaining = context.time_remaining()
    # Without a deadline grpcio reports an enormous remaining time rather than None.
    if remaining is None or remaining > 10**7:
        return None
    return time.monotonic() + remaining


def to_results(outcomes: Sequence[Outcome], ids: Sequence[str]) -> list[common_pb2.ItemResult]:
    results = []
    for item_id, outcome in zip(ids, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            error = status_pb2.Status(code=rpc_code_value(outcome.code), message=outcome.message)
            results.append(common_pb2.ItemResult(id=item_id, error=error))
        else:
            results.append(common_pb2.ItemResult(id=item_id, vector=common_pb2.Vector(values=outcome)))
    return results


def model_info(d: ModelDescription) -> encoder_pb2.ModelInfo:
    pre = d.spec.preprocess
    return encoder_pb2.ModelInfo(
        id=d.spec.id, family=d.spec.family, dim=d.spec.dim,
        modalities=[_MODALITY[m] for m in d.spec.modalities],
        preprocessing=encoder_pb2.Preprocessing(resize=pre.resize, crop=pre.crop,
                                                interpolation=pre.interpolation,
                                                mean=list(pre.mean), std=list(pre.std),
                                                resize_mode=pre.resize_mode),
        device=d.device, dtype=d.dtype, weights_source=d.weights_source,
        weights_sha256=d.weights_sha256 or d.spec.sha256, loaded=d.loaded,
        max_text_chars=d.spec.max_text_chars, backend=d.backend, execution_provider=d.execution_provider,
        base_model=d.spec.adapter.base_model if d.spec.adapter else "",
        adapter=d.spec.adapter.name if d.spec.adapter else "", adapter_sha256=d.adapter_sha256)


def _ids(images: Sequence[encoder_pb2.Image]) -> list[str]:
    return [img.id or str(i) for i, img in enumerate(images)]


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    """``EncoderService`` over an ``EncoderCore``."""

    def __init__(self, core: EncoderCore) -> None:
        self.core = core

    def EmbedImages(self, request: encoder_pb2.EmbedImagesRequest,
                    context: grpc.ServicerContext) -> encoder_pb2.EmbedImagesResponse:
        deadline = deadline_of(context)
        runtime = self.core.runtime(request.model)
        futures = self.core.submit_images(runtime, [img.data for img in request.images], deadline)
        if not context.add_callback(lambda: cancel_all(futures)):  # the caller went away: stop the work
            cancel_all(futures)
        outcomes = collect(futures, deadline, context.is_active)
        return encoder_pb2.EmbedImagesResponse(model=runtime.spec.id, dim=runtime.spec.dim,
                                               results=to_results(outcomes, _ids(request.images)))

    def StreamEmbedImages(self, request_iterator: Iterator[encoder_pb2.StreamEmbedImagesRequest],
                          context: grpc.ServicerContext) -> Iterator[encoder_pb2.StreamEmbedImagesResponse]:
        """Reads requests in a thread (up to STREAM_WINDOW in flight) and answers them in order."""
        deadline = deadline_of(context)
        pending: queue.Queue[_StreamEntry] = queue.Queue(maxsize=STREAM_WINDOW)
        stop = threading.Event()
        # Futures of messages not yet answered: cancelled when the caller goes away.
        live: dict[int, list[Future[Outcome]]] = {}
        live_lock = threading.Lock()

        def cancel_live() -> None:
            stop.set()
            with live_lock:
                for futures in live.values():
                    cancel_all(futures)

        if not context.add_callback(cancel_live):
            stop.set()

        def put(entry: _StreamEntry) -> bool:
            while not stop.is_set():  # the window is full: wait, unless the client went away
                try:
                    pending.put(entry, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for sequence, request in enumerate(request_iterator):
                    runtime = self.core.runtime(request.model)
                    futures = self.core.submit_images(runtime, [i.data for i in request.images], deadline)
                    with live_lock:
                        live[sequence] = futures
                    if stop.is_set():
                        cancel_all(futures)
                        return
                    if not put((runtime, _ids(request.images), futures)):
                        return
                put(None)
            except BaseException as exc:  # surfaces in the response stream below
                put(exc)

        reader = threading.Thread(target=read, name="stream-reader", daemon=True)
        reader.start()
        try:
            while True:
                try:
                    entry = pending.get(timeout=0.2)
                except queue.Empty:
                    # A reader that saw the caller go away ends without a last entry: so does this.
                    if stop.is_set() and not reader.is_alive() and pending.empty():
                        return
                    continue
                if entry is None:
                    return
                if isinstance(entry, BaseException):
                    raise entry
                runtime, ids, futures = entry
                outcomes = collect(futures, deadline, context.is_active)
                with live_lock:
                    live.pop(next(iter(live)), None)  # answered in order: the oldest entry is this one
                yield encoder_pb2.StreamEmbedImagesResponse(
                    model=runtime.spec.id, dim=runtime.spec.dim, results=to_results(outcomes, ids))
        finally:
            cancel_live()

    def EmbedTexts(self, request: encoder_pb2.EmbedTextsRequest,
                   context: grpc.ServicerContext) -> encoder_pb2.EmbedTextsResponse:
        runtime, outcomes = self.core.embed_texts(request.model, list(request.texts), deadline_of(context))
        return encoder_pb2.EmbedTextsResponse(
            model=runtime.spec.id, dim=runtime.spec.dim,
            results=to_results(outcomes, [str(i) for i in range(len(outcomes))]))

    def ListModels(self, request: encoder_pb2.ListModelsRequest,
                   context: grpc.ServicerContext) -> encoder_pb2.ListModelsResponse:
        return encoder_pb2.ListModelsResponse(models=[model_info(d) for d in self.core.describe_all()])

    def GetModel(self, request: encoder_pb2.GetModelRequest,
                 context: grpc.ServicerContext) -> encoder_pb2.GetModelResponse:
        model_id = request.model or self.core.settings.default_model
        return encoder_pb2.GetModelResponse(model=model_info(self.core.describe(model_id)))


def create_encoder_server(settings: EncoderSettings, registry: Registry | None = None,
                          preload: bool = True, background: bool = True,
                          stop_on_load_error: bool = False) -> tuple[RunningServer, EncoderCore]:
    """Starts an encoder server; health turns SERVING once the preloaded models are warm.

    Args:
        settings: the encoder's settings.
        registry: model registry (tests add tiny entries); the default registry when None.
        preload: load ``settings.models`` before reporting SERVING.
        background: load in a background thread (the server answers health meanwhile);
            False loads before returning.

    Returns:
        The running server and its core. If preloading fails, the server stays NOT_SERVING
        (or stops, with ``stop_on_load_error``), the error is logged and ``core.load_error`` holds it.
    """
    metrics_registry = CollectorRegistry()
    core = EncoderCore(settings, registry=registry, metrics_registry=metrics_registry)
    servicer = EncoderServicer(core)
    running = create_server(
        settings,
        [ServiceRegistration(SERVICE, lambda srv: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(
            servicer, srv))],
        registry=metrics_registry,
    )

    def warm() -> None:
        try:
            if preload:
                core.preload()
            running.set_serving(True)
        except Exception as exc:
            core.load_error = exc
            log.error("model preload failed: %s", exc)
            if stop_on_load_error:
                running.stop(0)

    if background:
        threading.Thread(target=warm, name="preload", daemon=True).start()
    else:
        warm()
    return running, core


def serve(settings: EncoderSettings) -> int:
    """Runs the encoder server until SIGTERM/SIGINT; returns the process exit code."""
    running, core = create_encoder_server(settings, background=True, stop_on_load_error=True)
    print(f"encoder listening on {settings.host}:{running.port} (metrics :{running.metrics_port})", flush=True)
    try:
        running.wait_for_signal(settings.grace_seconds)
    finally:
        core.close()
    return 1 if core.load_error is not None else 0
