"""The encoder core: loads models, decodes images in a worker pool, batches across requests.

Plain Python, no gRPC: the servicer converts messages, tests and in-process users call this.
An embedding is a float32 vector of unit L2 norm; a failed item is a ``ServiceError`` value in
its place, never a silently replaced vector.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from services.common.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
)
from services.common.priority import lower_thread_priority
from services.common.server import freeze_heap
from services.encoder import adapters, images
from services.encoder.backends import (
    BackendOptions,
    ExportCache,
    InferenceBackend,
    TorchBackend,
    build_backend,
    check_parity,
)
from services.encoder.batching import DynamicBatcher
from services.encoder.config import EncoderSettings
from services.encoder.families import FamilyModel, LoadContext, load_family_model
from services.encoder.metrics import EncoderMetrics
from services.encoder.registry import IMAGE, TEXT, ModelSpec, Registry

log = logging.getLogger(__name__)

Outcome = np.ndarray | ServiceError
"""One item's result: a float32 unit vector of shape (dim,), or the error that item met."""

_T = TypeVar("_T")


class Encoder(Protocol):
    """What the rest of the platform needs of an encoder (the seam for in-process use)."""

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed_images(self, images: Sequence[bytes], deadline: float | None = None) -> list[Outcome]: ...

    def embed_texts(self, texts: Sequence[str], deadline: float | None = None) -> list[Outcome]: ...


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {name!r} requested but CUDA is not available")
    return torch.device("cuda:0") if str(device) == "cuda" else device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (autocast) and float32 on the CPU."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise InvalidArgument(f"dtype {name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def _with_position(index: int, count: int, kind: str, error: ServiceError) -> ServiceError:
    """The same error, its message prefixed with where it happened ("image 3 of 8: ...")."""
    return type(error)(f"{kind} {index} of {count}: {error.message}")


def warm_up_images(crop: int, seed: int = 0) -> list[torch.Tensor]:
    """The warm-up batch: four uint8 (3, crop, crop) images that exercise the whole input range
    (seeded uniform noise, coarse blocks of noise, a smooth colour gradient, mid grey)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (3, crop, crop), generator=generator, dtype=torch.uint8)
    blocks = torch.randint(0, 256, (3, 8, 8), generator=generator, dtype=torch.uint8)
    blocks = blocks.repeat_interleave(-(-crop // 8), 1).repeat_interleave(-(-crop // 8), 2)[:, :crop, :crop]
    ramp = torch.linspace(0, 255, crop)
    gradient = torch.stack([ramp[None, :].expand(crop, crop), ramp[:, None].expand(crop, crop),
                            255 - ramp[None, :].expand(crop, crop)]).round().to(torch.uint8)
    grey = torch.full((3, crop, crop), 128, dtype=torch.uint8)
    return [noise, blocks.contiguous(), gradient, grey]


WARM_UP_TEXTS = ["a photo of a cat", "a diagram of a bridge at night", ""]
# Smallest padded batch on CUDA (see ``batch_buckets``).
MIN_BUCKET = 8


def batch_buckets(max_batch_size: int, device_type: str) -> list[int]:
    """The batch sizes a model runs on ``device_type``; others are padded up to the next one.

    On CUDA the first forward at each new input shape is slow: measured on an H100 (torch 2.11,
    cuDNN 9.19), EfficientNet-Lite0 in float16 ran 13,500 img/s at a batch size it had seen, and each
    batch size it had not seen cost ~2.4 s (cuDNN picks and builds kernels per shape, benchmark mode
    off or on). Dynamic batching makes every size from 1 to the maximum, so without buckets the
    service ran Lite0 at 18-65 img/s for minutes. So CUDA batches are padded to powers of two from
    ``MIN_BUCKET`` up to ``max_batch_size`` (which is also a bucket), each warmed up at load: at most
    2x the work on a device where that work is cheap. On the CPU shapes cost nothing extra: no
    buckets (an empty list).
    """
    if device_type != "cuda":
        return []
    buckets, size = [], MIN_BUCKET
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


class ModelRuntime:
    """A loaded, warm model on its device, with one batcher per modality.

    ``backend`` runs the model (eager torch when None); an ONNX Runtime backend is checked against
    its torch reference at ``warm_up``.
    """

    def __init__(self, spec: ModelSpec, family: FamilyModel, device: torch.device, dtype: torch.dtype,
                 settings: EncoderSettings, metrics: EncoderMetrics, backend: InferenceBackend | None = None) -> None:
        self.spec = spec
        self.family = family
        self.device = device
        self.dtype = dtype
        self._metrics = metrics
        self.backend: InferenceBackend = backend or TorchBackend(family, device, dtype)
        pre = spec.preprocess
        self._mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255.0
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self.max_admitted = settings.max_queue_items
        delay = settings.max_batch_delay_ms / 1000.0
        self.max_batch_size = settings.effective_max_batch_size(device.type)
        self.buckets = batch_buckets(self.max_batch_size, device.type)
        self.image_batcher: DynamicBatcher[torch.Tensor, Outcome] = DynamicBatcher(
            self._run_images, max_batch_size=self.max_batch_size, max_delay=delay,
            max_queue=settings.max_queue_items, name=f"{spec.id}-image",
            on_batch=self._observer(IMAGE), niceness=settings.work_niceness)
        self.text_batcher: DynamicBatcher[str, Outcome] | None = None
        if TEXT in spec.modalities and family.embed_texts is not None:
            self.text_batcher = DynamicBatcher(
                self._run_texts, max_batch_size=self.max_batch_size, max_delay=delay,
                max_queue=settings.max_queue_items, name=f"{spec.id}-text", on_batch=self._observer(TEXT),
                niceness=settings.work_niceness)
        metrics.precreate(spec.id, self.backend.name, (IMAGE, TEXT) if self.text_batcher is not None else (IMAGE,))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _observer(self, modality: str) -> Callable[[int, list[float]], None]:
        def observe(size: int, waits: list[float]) -> None:
            self._metrics.batch_size.labels(self.spec.id, modality).observe(size)
            queue_hist = self._metrics.duration.labels(self.spec.id, "queue", self.backend.name)
            for w in waits:
                queue_hist.observe(w)

        return observe

    def admit(self, count: int) -> None:
        """Reserves room for ``count`` items (decoding or queued) or refuses the whole request."""
        with self._admit_lock:
            if self._admitted + count > self.max_admitted:
                raise ResourceExhausted(
                    f"model {self.spec.id} is saturated: {self._admitted} items in progress, "
                    f"{count} more would exceed {self.max_admitted} (ENCODER_MAX_QUEUE_ITEMS); "
                    "retry with backoff")
            self._admitted += count

    def release(self, count: int = 1) -> None:
        with self._admit_lock:
            self._admitted -= count

    @property
    def in_progress(self) -> int:
        return self._admitted

    def _finalise(self, features: torch.Tensor) -> list[Outcome]:
        """float32, L2-normalised rows; a non-finite or zero row is an error for that item."""
        features = features.float()
        if features.ndim != 2 or features.shape[1] != self.spec.dim:
            raise Internal(f"model {self.spec.id} returned shape {tuple(features.shape)}, "
                           f"expected (batch, {self.spec.dim})")
        norms = features.norm(dim=1, keepdim=True)
        valid = torch.isfinite(features).all(dim=1) & (norms.squeeze(1) > 0) & torch.isfinite(norms.squeeze(1))
        normalised = (features / norms.clamp_min(torch.finfo(torch.float32).tiny)).cpu().numpy()
        valid_np = valid.cpu().numpy()
        return [
            normalised[i].copy() if valid_np[i] else Internal(
                f"model {self.spec.id} produced a non-finite or zero embedding "
                f"(dtype {self.dtype_name}); the item was not embedded")
            for i in range(len(valid_np))
        ]

    def _guarded(self, run: Callable[[Sequence[_T]], torch.Tensor], items: Sequence[_T]) -> list[Outcome]:
        """Runs a batch; on device out-of-memory retries it in halves down to single items."""
        try:
            return self._finalise(run(items))
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                return [ResourceExhausted(f"model {self.spec.id}: device out of memory for one item")]
            half = len(items) // 2
            log.warning("%s: out of memory on a batch of %d; retrying in halves", self.spec.id, len(items))
            return self._guarded(run, items[:half]) + self._guarded(run, items[half:])

    def _normalise(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(list(tensors))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        # uint8 travels to the device (4x less than float); normalisation runs there, batched.
        with torch.inference_mode():
            return (batch.float() - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) on the device to features (B, dim), the batch padded up to
        its bucket (``batch_buckets``) with copies of its last image, whose outputs are dropped."""
        n = x.shape[0]
        size = next((b for b in self.buckets if b >= n), n)
        if size > n:
            x = torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
        return self.backend.embed_images(x)[:n]

    def _forward_images(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward(self._normalise(tensors))

    def _run_images(self, tensors: list[torch.Tensor]) -> list[Outcome]:
        start = time.perf_counter()
        outcomes = self._guarded(self._forward_images, tensors)
        self._metrics.duration.labels(self.spec.id, "forward", self.backend.name).observe(time.perf_counter() - start)
        return outcomes

    def _forward_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.backend.embed_texts(list(texts))

    def _run_texts(self, texts: list[str]) -> list[Outcome]:
        start = time.perf_counter()
        outcomes = self._guarded(self._forward_texts, texts)
        self._metrics.duration.labels(self.spec.id, "forward_text", self.backend.name).observe(
            time.perf_counter() - start)
        return outcomes

    def warm_up(self) -> None:
        """Runs the model once per modality so the first request pays no lazy initialisation,
        checks that it really returns finite ``spec.dim``-dimensional vectors and, for a backend
        with a torch reference (ONNX Runtime), that every item of the warm-up batch agrees with
        torch (``backends.check_parity``).

        Raises:
            ServiceError: a non-finite or wrongly shaped output (Internal), or a parity failure
                (``ParityError``, FAILED_PRECONDITION).
        """
        batch = warm_up_images(self.spec.preprocess.crop)
        served = _vectors(self._run_images(batch))
        crop = self.spec.preprocess.crop
        start = time.perf_counter()
        for size in self.buckets:  # each batch shape the device will see, once (see batch_buckets)
            self.forward(torch.zeros(size, 3, crop, crop, device=self.device))
        if self.buckets:
            log.info("%s: batch sizes %s warmed up on %s in %.1f s", self.spec.id, self.buckets, self.device,
                     time.perf_counter() - start)
        reference = self.backend.reference
        if reference is not None:
            check_parity(self.spec.id, IMAGE, served, reference.embed_images(self._normalise(batch)), self.backend)
        if self.text_batcher is not None:
            served = _vectors(self._run_texts(WARM_UP_TEXTS))
            if reference is not None:
                check_parity(self.spec.id, TEXT, served, reference.embed_texts(WARM_UP_TEXTS), self.backend)

    def close(self) -> None:
        self.image_batcher.close()
        if self.text_batcher is not None:
            self.text_batcher.close()


def _vectors(outcomes: list[Outcome]) -> np.ndarray:
    """The outcomes as a (B, dim) array; the first error is raised."""
    for outcome in outcomes:
        if isinstance(outcome, ServiceError):
            raise outcome
    return np.stack([o for o in outcomes if isinstance(o, np.ndarray)])


@dataclass(frozen=True)
class ModelDescription:
    """A registry entry plus, when loaded, where and how it runs."""

    spec: ModelSpec
    loaded: bool
    device: str = ""
    dtype: str = ""
    weights_source: str = ""
    weights_sha256: str = ""
    backend: str = ""
    execution_provider: str = ""
    adapter_sha256: str = ""


class EncoderCore:
    """Models, the decode pool and the batchers of one encoder server (or in-process user)."""

    def __init__(self, settings: EncoderSettings, registry: Registry | None = None,
                 metrics_registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry()
        if settings.adapters_dir is not None:
            self.registry.adapters_dir = settings.adapters_dir
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.metrics = EncoderMetrics(metrics_registry or CollectorRegistry())
        self.metrics.queue_capacity.set(settings.max_queue_items)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        workers = settings.decode_workers or os.cpu_count() or 1
        self._decode_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode",
                                               initializer=lower_thread_priority, initargs=(settings.work_niceness,))
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader",
                                          initializer=lower_thread_priority, initargs=(settings.work_niceness,))
        self._models: dict[str, ModelRuntime] = {}
        self.load_error: Exception | None = None  # set when the preload at start-up failed
        self._load_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._load_context = LoadContext(weights_dir=settings.weights_dir, offline=settings.is_offline(),
                                         random_weights=settings.random_weights)
        self._backend_options = BackendOptions(
            backend=settings.backend, provider=settings.onnx_provider,
            threads=settings.effective_onnx_threads(), cache=ExportCache(settings.onnx_cache_dir),
            measure_batch=settings.effective_max_batch_size(self.device.type))
        self.registry.get(settings.default_model)  # fail at start-up on a typo, not on first request

    # -- models ---------------------------------------------------------------------------------

    def load(self, model_id: str) -> ModelRuntime:
        """Loads and warms up a model (once; concurrent callers wait for the same load)."""
        spec = self.registry.get(model_id)
        with self._lock:
            if spec.id in self._models:
                return self._models[spec.id]
            lock = self._load_locks.setdefault(spec.id, threading.Lock())
        with lock:
            if spec.id in self._models:
                return self._models[spec.id]
            if len(self._models) >= self.settings.max_loaded_models:
                raise ResourceExhausted(
                    f"model {spec.id}: {len(self._models)} models are loaded, the limit is "
                    f"{self.settings.max_loaded_models} (ENCODER_MAX_LOADED_MODELS); preload the models you need "
                    "with ENCODER_MODELS")
            # On the loader thread: the compute threads a backend starts (ONNX Runtime's pool at session
            # creation, PyTorch's OpenMP team at warm-up) inherit its lowered priority.
            runtime = self._loader.submit(self._build, spec).result()
            with self._lock:
                self._models[spec.id] = runtime
            freeze_heap()  # the model is here to stay: later full collections need not scan it
            return runtime

    def _build(self, spec: ModelSpec) -> ModelRuntime:
        """Loads, builds the backend of and warms up ``spec`` (on the loader thread)."""
        start = time.perf_counter()
        log.info("loading %s on %s (%s)", spec.id, self.device, str(self.dtype))
        if spec.adapter is not None:
            # The base network comes from the base's own entry (its weights file, its checksum).
            family = adapters.attach(spec, load_family_model(self.registry.get(spec.adapter.base_model),
                                                             self._load_context))
        else:
            family = load_family_model(spec, self._load_context)
        backend = build_backend(spec, family, self.device, self.dtype, self._backend_options)
        runtime = ModelRuntime(spec, family, self.device, self.dtype, self.settings, self.metrics, backend)
        try:
            runtime.warm_up()
        except BaseException:
            runtime.close()
            raise
        seconds = time.perf_counter() - start
        self.metrics.load_seconds.labels(spec.id).set(seconds)
        self.metrics.loaded.labels(spec.id).set(1)
        log.info("loaded %s in %.1f s from %s (backend %s%s)", spec.id, seconds, family.weights_source,
                 backend.name, f", {backend.provider}" if backend.provider else "")
        return runtime

    def preload(self) -> None:
        """Loads every model of ``settings.models``."""
        for model_id in self.settings.models:
            self.load(model_id)

    def runtime(self, model_id: str = "") -> ModelRuntime:
        """The loaded model for ``model_id`` ('' is the default), loading it on demand if allowed.

        Raises:
            NotFound: unknown model id.
            FailedPrecondition: known but not loaded here, and on-demand loading is off, or its
                weights are missing.
        """
        spec = self.registry.get(model_id or self.settings.default_model)
        runtime = self._models.get(spec.id)
        if runtime is not None:
            return runtime
        if not self.settings.load_on_demand:
            raise FailedPrecondition(f"model {spec.id} is known but not loaded on this server; add it "
                                     "to ENCODER_MODELS or turn on ENCODER_LOAD_ON_DEMAND")
        return self.load(spec.id)

    def describe(self, model_id: str) -> ModelDescription:
        spec = self.registry.get(model_id)
        runtime = self._models.get(spec.id)
        if runtime is None:
            if spec.adapter is not None:  # what the card says, until the load checks it
                return ModelDescription(spec=spec, loaded=False, weights_sha256=spec.adapter.base_weights_sha256,
                                        adapter_sha256=spec.adapter.head_sha256)
            return ModelDescription(spec=spec, loaded=False)
        return ModelDescription(spec=spec, loaded=True, device=str(runtime.device),
                                dtype=runtime.dtype_name, weights_source=runtime.family.weights_source,
                                weights_sha256=runtime.family.weights_sha256, backend=runtime.backend.name,
                                execution_provider=runtime.backend.provider,
                                adapter_sha256=runtime.family.adapter_sha256)

    def describe_all(self) -> list[ModelDescription]:
        return [self.describe(m) for m in self.registry.ids()]

    # -- embedding ------------------------------------------------------------------------------

    def _decode(self, runtime: ModelRuntime, data: bytes) -> torch.Tensor:
        start = time.perf_counter()
        tensor = images.load_tensor(data, runtime.spec.preprocess, max_bytes=self.settings.max_image_bytes,
                                    max_pixels=self.settings.max_pixels,
                                    max_aspect_ratio=self.settings.max_aspect_ratio)
        self.metrics.duration.labels(runtime.spec.id, "decode", runtime.backend.name).observe(
            time.perf_counter() - start)
        return tensor

    def submit_images(self, runtime: ModelRuntime, data: Sequence[bytes],
                      deadline: float | None = None) -> list[Future[Outcome]]:
        """Starts embedding ``data``: decode in the pool, then the model's batcher.

        Returns one future per image, resolved with its ``Outcome`` (never an exception). Cancelling
        a future (its caller went away) stops that item's work wherever it is: it is not decoded if it
        was still waiting for a decoder, and never reaches the model if it was waiting for a batch.

        Raises:
            InvalidArgument: no images.
            ResourceExhausted: more images than a request may carry, or the model is saturated.
        """
        count = len(data)
        if count == 0:
            raise InvalidArgument("the request has no images")
        if count > self.settings.max_images_per_request:
            raise ResourceExhausted(f"{count} images in one request, over the limit of "
                                    f"{self.settings.max_images_per_request}; split the batch")
        runtime.admit(count)
        gauge = self.metrics.queue_depth.labels(runtime.spec.id, IMAGE)
        gauge.set(runtime.in_progress)
        counter = self.metrics.images
        model = runtime.spec.id
        results: list[Future[Outcome]] = []
        for index, item in enumerate(data):
            out: Future[Outcome] = Future()
            results.append(out)

            def finish(outcome: Outcome | None, out: Future[Outcome] = out, index: int = index) -> None:
                """Releases the item's admission; ``None``: it was cancelled before it ran."""
                runtime.release()
                gauge.set(runtime.in_progress)
                if outcome is None:
                    outcome = Cancelled("cancelled before the model ran it")
                if out.cancelled() or not out.set_running_or_notify_cancel():  # the caller went away
                    counter.labels(model, "cancelled").inc()
                    return
                if isinstance(outcome, ServiceError):
                    outcome = _with_position(index, count, "image", outcome)
                counter.labels(model, "error" if isinstance(outcome, ServiceError) else "ok").inc()
                out.set_result(outcome)

            def decoded(fut: Future[torch.Tensor | None], finish: Callable[[Outcome | None], None] = finish,
                        out: Future[Outcome] = out) -> None:
                try:
                    tensor = fut.result()
                    if tensor is None:
                        finish(None)
                        return
                    [queued] = runtime.image_batcher.submit_many([tensor], deadline)
                except ServiceError as exc:
                    finish(exc)
                    return
                except Exception as exc:  # a decoder bug must not hang the request
                    log.exception("decoding failed")
                    finish(Internal(f"decoding failed: {type(exc).__name__}: {exc}"))
                    return
                def leave_queue(o: Future[Outcome], q: Future[Outcome] = queued) -> None:
                    if o.cancelled():
                        q.cancel()  # the batcher skips cancelled jobs

                out.add_done_callback(leave_queue)
                queued.add_done_callback(lambda q: finish(None if q.cancelled() else _outcome_of(q)))

            self._decode_pool.submit(self._decode_unless_cancelled, runtime, item, out).add_done_callback(decoded)
        return results

    def _decode_unless_cancelled(self, runtime: ModelRuntime, data: bytes,
                                 out: Future[Outcome]) -> torch.Tensor | None:
        return None if out.cancelled() else self._decode(runtime, data)

    def embed_images(self, model_id: str, data: Sequence[bytes],
                     deadline: float | None = None) -> tuple[ModelRuntime, list[Outcome]]:
        """Embeds encoded images with one model; returns the runtime and one outcome per image.

        Args:
            model_id: registry id ('' for the default model).
            data: encoded images.
            deadline: ``time.monotonic()`` time after which the work is abandoned.

        Raises:
            DeadlineExceeded: the deadline passed before every item was done.
        """
        runtime = self.runtime(model_id)
        futures = self.submit_images(runtime, data, deadline)
        return runtime, collect(futures, deadline)

    def embed_texts(self, model_id: str, texts: Sequence[str],
                    deadline: float | None = None) -> tuple[ModelRuntime, list[Outcome]]:
        """Embeds texts with a model's text tower; over-long texts fail on their own.

        Raises:
            InvalidArgument: no texts, or the model has no text tower.
            ResourceExhausted: too many texts in one request, or the model is saturated.
        """
        runtime = self.runtime(model_id)
        if runtime.text_batcher is None:
            raise InvalidArgument(f"model {runtime.spec.id} embeds images only; use a model with "
                                  "the text modality (e.g. clip-vit-b-32)")
        count = len(texts)
        if count == 0:
            raise InvalidArgument("the request has no texts")
        if count > self.settings.max_texts_per_request:
            raise ResourceExhausted(f"{count} texts in one request, over the limit of "
                                    f"{self.settings.max_texts_per_request}")
        limit = runtime.spec.max_text_chars
        outcomes: list[Outcome | None] = [None] * count
        accepted: list[int] = []
        for i, text in enumerate(texts):
            if len(text) > limit:
                outcomes[i] = InvalidArgument(f"text {i} of {count}: {len(text)} characters, over the "
                                              f"limit of {limit} for {runtime.spec.id}")
            else:
                accepted.append(i)
        if accepted:
            runtime.admit(len(accepted))
            try:
                futures = runtime.text_batcher.submit_many([texts[i] for i in accepted], deadline)
            except ServiceError:
                runtime.release(len(accepted))
                raise
            for fut in futures:
                fut.add_done_callback(lambda _f: runtime.release())
            for i, outcome in zip(accepted, collect(futures, deadline), strict=True):
                outcomes[i] = (_with_position(i, count, "text", outcome)
                               if isinstance(outcome, ServiceError) else outcome)
        done = [o for o in outcomes if o is not None]
        for o in done:
            self.metrics.texts.labels(runtime.spec.id, "error" if isinstance(o, ServiceError) else "ok").inc()
        return runtime, done

    def close(self) -> None:
        """Stops the batchers and the decode pool."""
        for runtime in list(self._models.values()):
            runtime.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _outcome_of(fut: Future[Outcome]) -> Outcome:
    try:
        return fut.result()
    except ServiceError as exc:
        return exc
    except Exception as exc:
        return Internal(f"{type(exc).__name__}: {exc}")


def collect(futures: Sequence[Future[Outcome]], deadline: float | None,
            is_active: Callable[[], bool] | None = None) -> list[Outcome]:
    """Waits for every future until ``deadline`` (monotonic seconds); cancels all on expiry, or as
    soon as ``is_active`` (the caller is still there) turns false.

    Raises:
        DeadlineExceeded: not all were done in time.
        Cancelled: some were cancelled (their caller went away).
    """
    pending: set[Future[Outcome]] = set(futures)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        step = left if is_active is None else (_ACTIVE_CHECK if left is None else min(left, _ACTIVE_CHECK))
        _, pending = wait_futures(pending, timeout=step)
        if is_active is not None and not is_active():
            cancel_all(list(pending))
        # A cancelled future counts as done here: ``wait`` only sees it once its owner notices.
        pending = {f for f in pending if not f.cancelled()}
        if pending and deadline is not None and time.monotonic() >= deadline:
            break
    if pending:
        for fut in pending:
            fut.cancel()
        raise DeadlineExceeded(f"deadline passed with {len(pending)} of {len(futures)} items not done")
    cancelled = sum(f.cancelled() for f in futures)
    if cancelled:
        raise Cancelled(f"{cancelled} of {len(futures)} items were cancelled")
    return [_outcome_of(f) for f in futures]


_ACTIVE_CHECK = 0.25  # seconds between checks that the caller is still there


def cancel_all(futures: Sequence[Future[Outcome]]) -> None:
    """Cancels the items not done yet (their caller went away): they stop where they are."""
    for fut in futures:
        fut.cancel()


class InProcessEncoder:
    """An ``Encoder`` over a core in this process (no gRPC), for local use and tests."""

    def __init__(self, core: EncoderCore, model_id: str = "") -> None:
        self._core = core
        self._runtime = core.runtime(model_id)

    @property
    def model_id(self) -> str:
        return self._runtime.spec.id

    @property
    def dim(self) -> int:
        return self._runtime.spec.dim

    def embed_images(self, images: Sequence[bytes], deadline: float | None = None) -> list[Outcome]:
        return self._core.embed_images(self.model_id, images, deadline)[1]

    def embed_texts(self, texts: Sequence[str], deadline: float | None = None) -> list[Outcome]:
        return self._core.embed_texts(self.model_id, texts, deadline)[1]
