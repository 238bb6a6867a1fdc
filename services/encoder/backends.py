"""Inference backends: what runs a family's torch module, eager PyTorch or ONNX Runtime.

The family builds the torch module; a backend runs it on normalised image batches (and token
batches for text towers). ``torch`` runs the module eagerly (channels-last for conv nets, autocast
on CUDA). ``onnxruntime`` runs the same module exported with ``torch.onnx.export`` at load time,
cached on disk by weights checksum, opset and torch version, and checked against torch at warm-up
(``check_parity``): a model whose ONNX Runtime outputs differ from torch's is not served, and
nothing falls back silently.

Which backend ``auto`` picks: ONNX Runtime on the CPU (measured 2-3.5x faster than torch for
EfficientNet-Lite0 on a 2-core x86); on CUDA, when ONNX Runtime's CUDA execution provider is
installed (the ``gpu`` extra), whichever of the two runs a warm-up-sized batch faster, measured
at load (``pick_faster``); without it, torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from services.common.errors import FailedPrecondition, InvalidArgument
from services.encoder.families import RANDOM_INIT, FamilyModel
from services.encoder.families.export import (
    EXPORT_FORMAT,
    INPUT,
    OPSET,
    OUTPUT,
    Tower,
    export_onnx,
    state_dict_sha256,
    towers,
)
from services.encoder.registry import IMAGE, TEXT, ModelSpec

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
BACKENDS = ("auto", TORCH, ONNXRUNTIME)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
# Warm-up parity: the smallest cosine similarity allowed between an item's ONNX Runtime embedding
# and its torch embedding (the acceptance bar; float32 exports measure 0.9999998+).
PARITY_MIN_COSINE = 0.9999
# Staging directories of the export cache older than this (seconds) belong to a dead process.
STALE_STAGING_S = 3600.0


class ParityError(FailedPrecondition):
    """ONNX Runtime's outputs differ from torch's on the warm-up batch; the model is not served."""


class InferenceBackend(Protocol):
    """Runs one model's towers on batches that are already on the model's device.

    Attributes:
        name: ``torch`` or ``onnxruntime``.
        provider: the ONNX Runtime execution provider in use (``CPUExecutionProvider``...), empty
            for torch.
        memory_format: the layout the image input is best given in.
        reference: the torch backend the outputs must agree with (parity at warm-up), or None.
    """

    name: str
    provider: str
    memory_format: torch.memory_format
    reference: TorchBackend | None

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images (B, 3, H, W) on the device to features (B, dim)."""
        ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts to features (B, dim); only for models with a text tower."""
        ...


class TorchBackend:
    """Eager PyTorch: channels-last for convolutional nets, autocast when the dtype is not float32."""

    name = TORCH
    provider = ""
    reference: TorchBackend | None = None

    def __init__(self, family: FamilyModel, device: torch.device, dtype: torch.dtype) -> None:
        self.family = family
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if family.channels_last else torch.contiguous_format
        self.module = family.module.to(device).to(memory_format=self.memory_format).eval()

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return self.family.embed_images(x.contiguous(memory_format=self.memory_format))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if self.family.embed_texts is None:
            raise InvalidArgument("this model has no text tower")
        with torch.inference_mode(), self._autocast():
            return self.family.embed_texts(texts)


def session_options(threads: int) -> ort.SessionOptions:
    """ONNX Runtime options for a server that also decodes images on the same cores.

    ``threads`` intra-op threads (0: ONNX Runtime's default, one per physical core), one inter-op
    thread (the graphs are sequential), and no spin-waiting: by default ONNX Runtime's workers spin
    for a while after each run, which steals the cores the decode pool needs between batches.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the optimiser's notes are not for operators
    return options


def resolve_provider(choice: str, device: torch.device) -> str:
    """The execution provider for ``choice`` ('auto', 'cpu', 'cuda', 'tensorrt') on ``device``.

    'auto' is the CUDA provider on a CUDA device and the CPU provider on the CPU.

    Raises:
        InvalidArgument: unknown choice, or a GPU provider for a CPU device (or the reverse).
        FailedPrecondition: the provider is not in this onnxruntime build (``pip install
            'retrieval-platform[gpu]'`` brings onnxruntime-gpu).
    """
    import onnxruntime as ort

    if choice == "auto":
        choice = "cuda" if device.type == "cuda" else "cpu"
    if choice not in PROVIDERS:
        raise InvalidArgument(f"ONNX Runtime provider {choice!r} is not one of auto, {', '.join(PROVIDERS)}")
    if (choice == "cpu") != (device.type == "cpu"):
        raise InvalidArgument(f"ONNX Runtime provider {choice!r} does not run on device {device}")
    provider = PROVIDERS[choice]
    available = ort.get_available_providers()
    if provider not in available:
        raise FailedPrecondition(
            f"ONNX Runtime has no {provider} in this install (available: {', '.join(available)}); install "
            "onnxruntime-gpu (pip install 'retrieval-platform[gpu]') or use --backend torch")
    return provider


def cuda_provider_available() -> bool:
    """Whether the installed onnxruntime can run on CUDA (onnxruntime-gpu)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return PROVIDERS["cuda"] in ort.get_available_providers()


def resolve_backend(requested: str, device: torch.device) -> str:
    """``torch``, ``onnxruntime``, or ``measure`` (auto on CUDA: time both at load, keep the faster).

    Raises:
        InvalidArgument: not one of auto, torch, onnxruntime.
    """
    if requested not in BACKENDS:
        raise InvalidArgument(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return ONNXRUNTIME
    return "measure" if cuda_provider_available() else TORCH


@dataclass(frozen=True)
class ExportCache:
    """Exported ONNX files on disk, one directory per (model, tower, dtype, key).

    The key is the SHA-256 of: the weights' SHA-256 (the weights file's, or of the state dict when
    the weights are not one file), the opset, the torch version, the export code's format number,
    the family, tower, dtype and input shape. A directory appears whole or not at all: the export
    is written into a temporary directory beside it and renamed into place (atomic on one file
    system), so a crash or a concurrent export never leaves a half-written model to be loaded.

    Attributes:
        root: the cache directory (``ENCODER_ONNX_CACHE_DIR``).
    """

    root: Path

    def entry(self, spec: ModelSpec, tower: Tower, dtype: str, weights_sha256: str,
              opset: int = OPSET) -> Path:
        """The directory of this export (it may not exist yet)."""
        fields = {"weights_sha256": weights_sha256, "opset": opset, "torch": torch.__version__,
                  "format": EXPORT_FORMAT, "family": spec.family, "tower": tower.modality, "dtype": dtype,
                  "input": [str(tower.example.dtype), *tower.example.shape[1:]]}
        key = _sha256_json(fields)
        safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.id)
        return self.root / f"{safe_id}-{tower.modality}-{dtype}-{key[:20]}"

    def get_or_export(self, entry: Path, export: Callable[[Path], None], meta: dict[str, Any]) -> tuple[Path, bool]:
        """The model file of ``entry``, exporting it with ``export(path)`` first when missing.

        Returns:
            (path of ``model.onnx``, whether it was already cached).
        """
        model = entry / "model.onnx"
        if model.is_file():
            return model, True
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_staging()
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=self.root))
        try:
            export(staging / "model.onnx")
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            try:
                os.rename(staging, entry)
            except OSError:
                if not model.is_file():  # not a concurrent export of the same entry: a real error
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return model, False


    def remove_stale_staging(self, older_than_s: float = STALE_STAGING_S) -> None:
        """Removes staging directories left by exports that died (killed mid-export), once they are
        older than ``older_than_s`` seconds (a live export is never that slow)."""
        cutoff = time.time() - older_than_s
        for stale in self.root.glob(".export-*"):
            try:
                if stale.stat().st_mtime < cutoff:
                    shutil.rmtree(stale, ignore_errors=True)
            except FileNotFoundError:
                continue


def _sha256_json(fields: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_onnx(tower: Tower, dtype: torch.dtype) -> Callable[[Path], None]:
    """An ``export(path)`` for the cache: torch.onnx.export, then float16 conversion when asked."""

    def write(path: Path) -> None:
        export_onnx(tower, path)
        if dtype == torch.float16:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # Inputs and outputs stay float32 (the runtime's contract); the graph computes in float16,
            # with the converter's default list of numerically sensitive ops kept in float32.
            model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
            onnx.save(model, str(path))

    return write


@contextmanager
def _exported(spec: ModelSpec, family: FamilyModel, tower: Tower, dtype: torch.dtype,
              cache: ExportCache | None) -> Iterator[tuple[Path, bool]]:
    """The ONNX file of ``tower`` and whether it was cached: from the cache, exported into it, or
    (random-init weights, or no cache) exported into a temporary directory that is removed once
    the session has loaded it.

    Random-initialised weights differ at every start (they are not seeded), so a cache entry for
    them could never be reused and would only fill the disk: they are never cached.
    """
    write = _write_onnx(tower, dtype)
    start = time.perf_counter()
    if cache is None or family.weights_source == RANDOM_INIT:
        with tempfile.TemporaryDirectory(prefix="onnx-export-") as tmp:
            path = Path(tmp) / "model.onnx"
            write(path)
            log.info("%s: exported the %s tower to ONNX in %.1f s (not cached: %s)", spec.id, tower.modality,
                     time.perf_counter() - start, "random weights" if cache else "no cache directory")
            yield path, False
        return
    weights = family.weights_sha256 or state_dict_sha256(family.module)
    entry = cache.entry(spec, tower, _dtype_name(dtype), weights)
    meta = {"model": spec.id, "tower": tower.modality, "dtype": _dtype_name(dtype), "weights_sha256": weights,
            "weights_source": family.weights_source, "opset": OPSET, "torch": torch.__version__,
            "format": EXPORT_FORMAT}
    path, hit = cache.get_or_export(entry, write, meta)
    log.info("%s: %s tower ONNX %s in %.1f s (%s)", spec.id, tower.modality,
             "loaded from the cache" if hit else "exported", time.perf_counter() - start, path)
    yield path, hit


class OnnxRuntimeBackend:
    """The model's towers exported to ONNX and run by ONNX Runtime.

    On CUDA the image input is bound to ONNX Runtime in place (I/O binding on the torch tensor's
    device memory), so batches never travel through the host.
    """

    name = ONNXRUNTIME
    memory_format = torch.contiguous_format

    def __init__(self, sessions: dict[str, ort.InferenceSession], provider: str, device: torch.device,
                 dim: int, tokenize: Callable[[list[str]], torch.Tensor] | None, reference: TorchBackend) -> None:
        self._sessions = sessions
        self.provider = provider
        self.device = device
        self.dim = dim
        self._tokenize = tokenize
        self.reference: TorchBackend | None = reference
        self.cache_hits: dict[str, bool] = {}

    @classmethod
    def create(cls, spec: ModelSpec, reference: TorchBackend, *, provider: str, threads: int,
               cache: ExportCache | None) -> OnnxRuntimeBackend:
        """Exports (or loads from ``cache``) every tower of ``reference``'s model and opens sessions.

        Raises:
            InvalidArgument: a dtype ONNX Runtime is not run with here (bfloat16; float16 on the CPU).
            FailedPrecondition: ONNX Runtime did not take the requested execution provider.
        """
        import onnxruntime as ort

        device, dtype = reference.device, reference.dtype
        if dtype not in (torch.float32, torch.float16) or (dtype == torch.float16 and device.type != "cuda"):
            raise InvalidArgument(f"model {spec.id}: the onnxruntime backend runs float32, or float16 on CUDA, "
                                  f"not {_dtype_name(dtype)} on {device.type}; use --backend torch")
        options = session_options(threads)
        provider_list: list[str | tuple[str, dict[str, Any]]] = [provider]
        if provider != PROVIDERS["cpu"]:
            # Nodes a GPU provider does not take run on the next one: TensorRT, then CUDA, then CPU.
            gpu = [PROVIDERS["tensorrt"], PROVIDERS["cuda"]] if provider == PROVIDERS["tensorrt"] else [provider]
            provider_list = [(p, {"device_id": device.index or 0}) for p in gpu] + [PROVIDERS["cpu"]]
        sessions: dict[str, ort.InferenceSession] = {}
        hits: dict[str, bool] = {}
        for tower in towers(spec, reference.family, device, torch.float32):
            with _exported(spec, reference.family, tower, dtype, cache) as (path, hit):
                session = ort.InferenceSession(str(path), options, providers=provider_list)
            hits[tower.modality] = hit
            if session.get_providers()[0] != provider:
                raise FailedPrecondition(
                    f"model {spec.id}: ONNX Runtime runs the {tower.modality} tower on "
                    f"{session.get_providers()[0]}, not the requested {provider}")
            sessions[tower.modality] = session
        backend = cls(sessions, provider, device, spec.dim, reference.family.tokenize, reference)
        backend.cache_hits = hits
        return backend

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        session = self._sessions[IMAGE]
        x = x.float().contiguous()
        if self.device.type != "cuda":
            return torch.from_numpy(_run(session, x.numpy()))
        return self._run_bound(session, x)

    def _run_bound(self, session: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
        """Runs on device memory: the input and a pre-allocated output are torch CUDA tensors."""
        out = torch.empty((x.shape[0], self.dim), dtype=torch.float32, device=self.device)
        binding = session.io_binding()
        index = self.device.index or 0
        binding.bind_input(INPUT, "cuda", index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT, "cuda", index, np.float32, list(out.shape), out.data_ptr())
        # torch and ONNX Runtime use different CUDA streams: the input must be written before ORT
        # reads it, and ORT's output written before torch reads it.
        torch.cuda.synchronize(self.device)
        _guard_memory(lambda: session.run_with_iobinding(binding))
        binding.synchronize_outputs()
        return out

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if TEXT not in self._sessions or self._tokenize is None:
            raise InvalidArgument("this model has no text tower")
        tokens = self._tokenize(texts).to(torch.int64).numpy()
        return torch.from_numpy(_run(self._sessions[TEXT], tokens)).to(self.device)


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    result = _guard_memory(lambda: session.run([OUTPUT], {INPUT: x}))
    return np.asarray(result[0])


def _guard_memory(run: Callable[[], Any]) -> Any:
    """ONNX Runtime's allocation failures as torch's out-of-memory error (the runtime halves the batch)."""
    try:
        return run()
    except Exception as exc:
        if "allocat" in str(exc).lower() and "memory" in str(exc).lower():
            raise torch.OutOfMemoryError(f"ONNX Runtime: {exc}") from exc
        raise


def pick_faster(candidates: list[InferenceBackend], example: torch.Tensor, repeats: int = 5) -> tuple[
        InferenceBackend, dict[str, float]]:
    """The candidate with the most images/s on ``example`` (best of ``repeats`` timed runs after one
    untimed run); returns it and images/s per backend name."""
    speeds: dict[str, float] = {}
    for backend in candidates:
        backend.embed_images(example)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            backend.embed_images(example)
            if example.device.type == "cuda":
                torch.cuda.synchronize(example.device)
            best = min(best, time.perf_counter() - start)
        speeds[backend.name] = example.shape[0] / best
    winner = max(candidates, key=lambda b: speeds[b.name])
    return winner, speeds


@dataclass(frozen=True)
class BackendOptions:
    """How ``build_backend`` chooses and builds.

    Attributes:
        backend: 'auto', 'torch' or 'onnxruntime'.
        provider: ONNX Runtime execution provider choice ('auto', 'cpu', 'cuda', 'tensorrt').
        threads: ONNX Runtime intra-op threads (0: ONNX Runtime's default).
        cache: where exports are cached (None: export at every load).
        measure_batch: batch size of the auto measurement on CUDA.
    """

    backend: str = "auto"
    provider: str = "auto"
    threads: int = 0
    cache: ExportCache | None = None
    measure_batch: int = 32


def build_backend(spec: ModelSpec, family: FamilyModel, device: torch.device, dtype: torch.dtype,
                  options: BackendOptions) -> InferenceBackend:
    """The backend that will serve ``family`` (parity is checked later, at warm-up).

    Raises:
        InvalidArgument: unknown backend or provider, or a dtype the chosen backend does not run.
        FailedPrecondition: ONNX Runtime lacks the execution provider.
    """
    choice = resolve_backend(options.backend, device)
    reference = TorchBackend(family, device, dtype)
    if choice == TORCH:
        return reference
    provider = resolve_provider(options.provider, device)
    ort_backend = OnnxRuntimeBackend.create(spec, reference, provider=provider, threads=options.threads,
                                            cache=options.cache)
    if choice == ONNXRUNTIME:
        return ort_backend
    crop = spec.preprocess.crop
    example = torch.randn(options.measure_batch, 3, crop, crop, device=device)
    winner, speeds = pick_faster([reference, ort_backend], example)
    log.info("%s: backend auto on %s picked %s (images/s at batch %d: %s)", spec.id, device, winner.name,
             options.measure_batch, ", ".join(f"{k} {v:.0f}" for k, v in speeds.items()))
    return winner


def check_parity(model_id: str, modality: str, served: np.ndarray, reference: torch.Tensor,
                 backend: InferenceBackend, min_cosine: float = PARITY_MIN_COSINE) -> np.ndarray:
    """Cosine similarity per item between the served embeddings and torch's; raises below ``min_cosine``.

    Args:
        served: (B, dim) embeddings from the serving backend (any scale).
        reference: (B, dim) torch features of the same inputs.

    Returns:
        The cosine similarities (B,).

    Raises:
        ParityError: some item is below ``min_cosine`` or not finite; the message names the worst item.
    """
    a = np.asarray(served, dtype=np.float64)
    b = reference.detach().float().cpu().numpy().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    cosine = np.nan_to_num(cosine, nan=-1.0)
    worst = int(np.argmin(cosine))
    if cosine[worst] < min_cosine:
        raise ParityError(
            f"model {model_id}: {backend.name} ({backend.provider}) disagrees with torch on the warm-up "
            f"{modality} batch: item {worst} of {len(cosine)} has cosine similarity {cosine[worst]:.6f}, below "
            f"{min_cosine}; the model is not served (start it with --backend torch, or report the export)")
    return cosine
