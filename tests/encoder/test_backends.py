"""Inference backends: ONNX Runtime against torch for every family, the export cache, backend
selection, GetModel's backend fields, and a parity failure that keeps a model from serving."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.client import channel

from services.common.errors import FailedPrecondition, InvalidArgument
from services.encoder import backends
from services.encoder.backends import (
    BackendOptions,
    OnnxRuntimeBackend,
    ParityError,
    TorchBackend,
    build_backend,
    check_parity,
    pick_faster,
    resolve_backend,
    resolve_provider,
)
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore, warm_up_images
from services.encoder.families import LoadContext, load_family_model
from services.encoder.families.export import Tower
from services.encoder.images import load_tensor
from services.encoder.registry import IMAGE, OPENAI_CLIP_STD, TEXT, ModelSpec, Preprocess, Registry
from services.encoder.servicer import create_encoder_server
from tests.encoder.conftest import MAX_MESSAGE, TINY_DINOV2, plumbing_registry, start_server
from tests.encoder.images import encode, gradient

# The real open_clip family code on a two-layer ViT and text transformer: seconds to export.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP = ModelSpec(
    id="clip-tiny", family="openclip", dim=16,
    preprocess=Preprocess(resize=64, crop=64, std=OPENAI_CLIP_STD), modalities=(IMAGE, TEXT),
    weights={"pretrained": ""}, params={"arch": "tiny-test-clip"}, max_text_chars=1000,
)
TEXTS = ["a photo of a cat", "a photo of a dog", "", "an aeroplane over the sea at dusk, oil painting"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    import open_clip

    config = tmp_path_factory.mktemp("openclip") / "tiny-test-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    registry = plumbing_registry()
    registry.register(TINY_CLIP)
    return registry


def _images(spec: ModelSpec, n: int = 6) -> list[torch.Tensor]:
    """Decoded, resized and cropped JPEGs of several sizes, as the service would feed the model."""
    data = [encode(gradient(120 + 37 * i, 90 + 23 * i), "JPEG", quality=85) for i in range(n)]
    return [load_tensor(d, spec.preprocess, max_bytes=1 << 24, max_pixels=1 << 26) for d in data]


def _normalised(spec: ModelSpec, tensors: list[torch.Tensor]) -> torch.Tensor:
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1) * 255
    return (torch.stack(tensors).float() - mean) / std


def _ort(spec: ModelSpec) -> OnnxRuntimeBackend:
    family = load_family_model(spec, LoadContext(random_weights=True))
    backend = build_backend(spec, family, torch.device("cpu"), torch.float32,
                            BackendOptions(backend="onnxruntime", threads=2))
    assert isinstance(backend, OnnxRuntimeBackend)
    return backend


# -- parity, every family, random init ----------------------------------------------------------------

@pytest.mark.parametrize("model_id", ["efficientnet-lite0", "resnet18", "dinov2-tiny", "clip-tiny"])
def test_onnxruntime_matches_torch_for_every_family(registry: Registry, model_id: str) -> None:
    spec = registry.get(model_id)
    backend = _ort(spec)
    assert backend.reference is not None and backend.provider == "CPUExecutionProvider"
    x = _normalised(spec, _images(spec) + warm_up_images(spec.preprocess.crop))
    served = backend.embed_images(x)
    assert served.shape == (x.shape[0], spec.dim) and served.dtype == torch.float32
    cosine = check_parity(spec.id, IMAGE, served.numpy(), backend.reference.embed_images(x), backend)
    assert cosine.min() >= 0.9999, cosine
    # Batch size is a dynamic axis: one item alone gives the same vector.
    np.testing.assert_allclose(backend.embed_images(x[:1]).numpy()[0], served.numpy()[0], rtol=1e-4, atol=1e-5)


def test_onnxruntime_text_tower_matches_torch(registry: Registry) -> None:
    backend = _ort(registry.get("clip-tiny"))
    assert set(backend.modalities) == {IMAGE, TEXT}
    served = backend.embed_texts(TEXTS)
    assert backend.reference is not None
    cosine = check_parity("clip-tiny", TEXT, served.numpy(), backend.reference.embed_texts(TEXTS), backend)
    assert served.shape == (len(TEXTS), 16) and cosine.min() >= 0.9999, cosine


def test_parity_check_names_the_worst_item() -> None:
    reference = torch.eye(3, 4)
    served = reference.numpy().copy()
    served[1] = [1.0, 1.0, 0.0, 0.0]  # cosine 0.7071 with its reference
    with pytest.raises(ParityError, match=r"item 1 of 3 has cosine similarity 0\.707107, below 0\.9999"):
        check_parity("m", IMAGE, served, reference, TorchBackend.__new__(TorchBackend))
    served[1] = [np.nan, 0, 0, 0]
    with pytest.raises(ParityError, match="item 1 of 3"):
        check_parity("m", IMAGE, served, reference, TorchBackend.__new__(TorchBackend))


# -- the export cache ---------------------------------------------------------------------------------

def _save_tiny_dinov2(weights_dir: Path, seed: int) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(patch_size=14, image_size=518, **TINY_DINOV2.params["config"])
    Dinov2Model(config).save_pretrained(weights_dir / TINY_DINOV2.id)


@pytest.fixture
def counted_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = backends.export_onnx

    def export(tower: Tower, path: Path) -> None:
        calls.append(path)
        real(tower, path)

    monkeypatch.setattr(backends, "export_onnx", export)
    return calls


def _embed_with_fresh_core(settings: EncoderSettings) -> tuple[dict[str, bool], np.ndarray]:
    core = EncoderCore(settings, registry=plumbing_registry())
    try:
        runtime = core.runtime(TINY_DINOV2.id)
        assert isinstance(runtime.backend, OnnxRuntimeBackend)
        _, outcomes = core.embed_images(TINY_DINOV2.id, [encode(gradient(), "JPEG")])
        return dict(runtime.backend.cache_hits), np.stack(outcomes)
    finally:
        core.close()


def test_export_cache_is_reused_by_a_restart_and_keyed_by_the_weights(tmp_path: Path,
                                                                      counted_exports: list[Path]) -> None:
    weights, cache = tmp_path / "weights", tmp_path / "onnx"
    _save_tiny_dinov2(weights, seed=0)
    settings = EncoderSettings(models=[], metrics_port=-1, weights_dir=weights, onnx_cache_dir=cache,
                               backend="onnxruntime")
    hits, first = _embed_with_fresh_core(settings)
    assert hits == {IMAGE: False} and len(counted_exports) == 1
    [entry] = list(cache.iterdir())  # no staging directory left behind
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "model.onnx"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["opset"] == 18 and meta["torch"] == torch.__version__ and len(meta["weights_sha256"]) == 64

    hits, second = _embed_with_fresh_core(settings)  # a restart: the same weights load the cached file
    assert hits == {IMAGE: True} and len(counted_exports) == 1
    np.testing.assert_array_equal(first, second)

    _save_tiny_dinov2(weights, seed=1)  # new weights, new checksum: exported again, beside the old one
    hits, third = _embed_with_fresh_core(settings)
    assert hits == {IMAGE: False} and len(counted_exports) == 2
    assert len(list(cache.iterdir())) == 2 and not np.allclose(first, third)


def test_a_failed_export_leaves_nothing_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, cache = tmp_path / "weights", tmp_path / "onnx"
    _save_tiny_dinov2(weights, seed=0)

    def broken(tower: Tower, path: Path) -> None:
        path.write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(backends, "export_onnx", broken)
    core = EncoderCore(EncoderSettings(models=[], metrics_port=-1, weights_dir=weights, onnx_cache_dir=cache,
                                       backend="onnxruntime"), registry=plumbing_registry())
    try:
        with pytest.raises(RuntimeError, match="exporter crashed"):
            core.runtime(TINY_DINOV2.id)
    finally:
        core.close()
    assert list(cache.iterdir()) == []


def test_staging_left_by_a_killed_export_is_removed_once_stale(tmp_path: Path) -> None:
    cache = backends.ExportCache(tmp_path)
    old, fresh = tmp_path / ".export-old", tmp_path / ".export-fresh"
    for d in (old, fresh):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * backends.STALE_STAGING_S,) * 2)
    cache.remove_stale_staging()
    assert not old.exists() and fresh.exists()  # a fresh one may be a live export in another process


def test_random_weights_are_never_cached(tmp_path: Path) -> None:
    core = EncoderCore(EncoderSettings(models=[], metrics_port=-1, random_weights=True, onnx_cache_dir=tmp_path,
                                       backend="onnxruntime"), registry=plumbing_registry())
    try:
        runtime = core.runtime(TINY_DINOV2.id)
        assert isinstance(runtime.backend, OnnxRuntimeBackend) and runtime.backend.cache_hits == {IMAGE: False}
    finally:
        core.close()
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


# -- choosing a backend -------------------------------------------------------------------------------

def test_auto_is_onnxruntime_on_cpu_and_a_measurement_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend("auto", cpu) == "onnxruntime"
    assert resolve_backend("torch", cpu) == "torch" and resolve_backend("onnxruntime", cuda) == "onnxruntime"
    monkeypatch.setattr(backends, "cuda_provider_available", lambda: True)
    assert resolve_backend("auto", cuda) == "measure"
    monkeypatch.setattr(backends, "cuda_provider_available", lambda: False)
    assert resolve_backend("auto", cuda) == "torch"  # the CPU build of onnxruntime cannot run there
    with pytest.raises(InvalidArgument, match="not one of auto, torch, onnxruntime"):
        resolve_backend("tensorflow", cpu)


def test_execution_providers_are_explicit() -> None:
    assert resolve_provider("auto", torch.device("cpu")) == "CPUExecutionProvider"
    with pytest.raises(InvalidArgument, match="does not run on device cpu"):
        resolve_provider("cuda", torch.device("cpu"))
    if not backends.cuda_provider_available():  # the CPU wheel: a clear error, not a CPU fallback
        with pytest.raises(FailedPrecondition, match="onnxruntime-gpu"):
            resolve_provider("auto", torch.device("cuda", 0))


class _Sleeper:
    provider = ""
    reference = None
    memory_format = torch.contiguous_format

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def test_pick_faster_keeps_the_backend_with_more_images_per_second() -> None:
    slow, fast = _Sleeper("torch", 0.02), _Sleeper("onnxruntime", 0.002)
    winner, speeds = pick_faster([slow, fast], torch.zeros(4, 3, 8, 8), repeats=2)
    assert winner is fast and speeds["onnxruntime"] > 3 * speeds["torch"]


def test_backend_setting_and_unsupported_dtypes(monkeypatch: pytest.MonkeyPatch, registry: Registry) -> None:
    monkeypatch.setenv("ENCODER_BACKEND", "torch")
    settings = EncoderSettings(models=[], metrics_port=-1, random_weights=True)
    assert settings.backend == "torch"
    core = EncoderCore(settings, registry=plumbing_registry())
    try:
        described = core.describe(core.runtime(TINY_DINOV2.id).spec.id)
        assert (described.backend, described.execution_provider) == ("torch", "")
    finally:
        core.close()
    monkeypatch.setenv("ENCODER_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="backend"):
        EncoderSettings()
    family = load_family_model(TINY_DINOV2, LoadContext(random_weights=True))
    with pytest.raises(InvalidArgument, match="runs float32, or float16 on CUDA, not bfloat16"):
        build_backend(TINY_DINOV2, family, torch.device("cpu"), torch.bfloat16, BackendOptions(backend="onnxruntime"))


# -- the service --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "provider"), [("auto", "CPUExecutionProvider"), ("torch", "")])
def test_get_model_reports_backend_and_execution_provider(backend: str, provider: str) -> None:
    running, core, chan = start_server(models=[TINY_DINOV2.id], default_model=TINY_DINOV2.id, random_weights=True,
                                       backend=backend)
    try:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        info = stub.GetModel(encoder_pb2.GetModelRequest(model=TINY_DINOV2.id)).model
        assert (info.backend, info.execution_provider) == ("onnxruntime" if backend == "auto" else "torch", provider)
        unloaded = stub.GetModel(encoder_pb2.GetModelRequest(model="resnet18")).model
        assert (unloaded.loaded, unloaded.backend, unloaded.execution_provider) == (False, "", "")
    finally:
        chan.close()
        running.stop(0)
        core.close()


@pytest.fixture
def corrupted_exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Exports whose weights are perturbed, so that ONNX Runtime disagrees with torch."""
    real = backends.export_onnx

    def export(tower: Tower, path: Path) -> None:
        saved = {k: v.clone() for k, v in tower.module.state_dict().items()}
        with torch.no_grad():
            for p in tower.module.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        try:
            real(tower, path)
        finally:
            tower.module.load_state_dict(saved)

    monkeypatch.setattr(backends, "export_onnx", export)
    yield


@pytest.mark.usefixtures("corrupted_exports")
def test_a_parity_failure_keeps_the_model_from_serving_and_says_why() -> None:
    settings = EncoderSettings(port=0, metrics_port=-1, max_message_bytes=MAX_MESSAGE, models=[TINY_DINOV2.id],
                               default_model=TINY_DINOV2.id, random_weights=True, backend="onnxruntime")
    running, core = create_encoder_server(settings, registry=plumbing_registry(), background=False)
    chan = channel(f"127.0.0.1:{running.port}")
    try:
        assert isinstance(core.load_error, ParityError)
        assert "disagrees with torch on the warm-up image batch" in core.load_error.message
        health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not core.describe(TINY_DINOV2.id).loaded
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        with pytest.raises(grpc.RpcError) as err:  # loading on demand meets the same check
            stub.EmbedImages(encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=encode(gradient(), "PNG"))]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cosine similarity" in (err.value.details() or "")
    finally:
        chan.close()
        running.stop(0)
        core.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not backends.cuda_provider_available(),
                    reason="needs a CUDA device and onnxruntime-gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_onnxruntime_on_cuda_matches_torch(registry: Registry, dtype: torch.dtype) -> None:
    spec = registry.get("resnet18")
    family = load_family_model(spec, LoadContext(random_weights=True))
    device = torch.device("cuda", 0)
    backend = build_backend(spec, family, device, dtype, BackendOptions(backend="onnxruntime"))
    assert isinstance(backend, OnnxRuntimeBackend) and backend.provider == "CUDAExecutionProvider"
    x = _normalised(spec, _images(spec)).to(device)
    served = backend.embed_images(x)
    assert backend.reference is not None and served.device == x.device
    check_parity(spec.id, IMAGE, served.cpu().numpy(), backend.reference.embed_images(x), backend,
                 min_cosine=0.9999 if dtype == torch.float32 else 0.999)
