"""Adapter models ``<base>+<name>`` served from the adapters directory: the base forward, the head and
the L2 normalisation on both backends, both checksums in GetModel, refusals (base weights that are not
the card's, a damaged head) and a registry that resolves adapter ids without remembering them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

from services.adapters.train import HeadModule
from services.common.adapters import HEAD_FILE, apply_head, write_adapter
from services.common.clients import channel, wait_serving
from services.encoder.config import EncoderSettings
from services.encoder.registry import Registry
from services.encoder.servicer import create_encoder_server
from tests.conftest import sample_caltech

pytestmark = pytest.mark.slow  # real EfficientNet-Lite0 weights

LITE0_SHA = Registry().get("efficientnet-lite0").sha256


def _adapter(root: Path, name: str, base_sha: str = LITE0_SHA, base: str = "efficientnet-lite0",
             in_dim: int = 1280, hidden: int = 32, softmax: bool = False) -> None:
    torch.manual_seed(len(name))
    head = HeadModule(in_dim, 12, hidden, softmax=softmax).to_head()
    write_adapter(root / name, head, {"name": name, "base": {"model": base, "weights_sha256": base_sha}})


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    _adapter(root, "good")
    _adapter(root, "classifier", hidden=0, softmax=True)
    _adapter(root, "other-weights", base_sha="0" * 64)
    _adapter(root, "damaged")
    path = root / "damaged" / HEAD_FILE
    data = bytearray(path.read_bytes())
    data[-30] ^= 0x55
    path.write_bytes(bytes(data))
    _adapter(root, "for-resnet", base="resnet18", in_dim=512)
    (root / "not-an-adapter").mkdir()
    return root


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def served(request: pytest.FixtureRequest, adapters_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[encoder_pb2_grpc.EncoderServiceStub, object]]:
    settings = EncoderSettings(port=0, metrics_port=-1, models=["efficientnet-lite0"], adapters_dir=adapters_dir,
                               backend=request.param, onnx_cache_dir=tmp_path_factory.mktemp("onnx"),
                               max_batch_delay_ms=2)
    running, core = create_encoder_server(settings)
    chan = channel(f"127.0.0.1:{running.port}")
    wait_serving(chan, timeout=300)
    yield encoder_pb2_grpc.EncoderServiceStub(chan), core
    chan.close()
    running.stop(0)
    core.close()


def _images() -> list[bytes]:
    return [path.read_bytes() for path, _ in sample_caltech(classes=3, per_class=2, seed=5)]


def _embed(stub: encoder_pb2_grpc.EncoderServiceStub, model: str, images: list[bytes]) -> np.ndarray:
    response = stub.EmbedImages(encoder_pb2.EmbedImagesRequest(
        model=model, images=[encoder_pb2.Image(data=d) for d in images]))
    assert response.model == model
    return np.stack([np.asarray(r.vector.values, dtype=np.float32) for r in response.results])


@pytest.mark.parametrize("name", ["good", "classifier"])
def test_an_adapter_model_is_the_base_then_the_head(served: tuple[encoder_pb2_grpc.EncoderServiceStub, object],
                                                    adapters_dir: Path, name: str) -> None:
    stub, _ = served
    images = _images()
    base = _embed(stub, "efficientnet-lite0", images)
    adapted = _embed(stub, f"efficientnet-lite0+{name}", images)
    from services.common.adapters import read_card, read_head

    head, _ = read_head(adapters_dir / name, read_card(adapters_dir / name))
    expected = apply_head(head, base)
    assert adapted.shape == (len(images), 12)
    np.testing.assert_allclose(np.linalg.norm(adapted, axis=1), 1.0, atol=1e-5)
    assert (adapted * expected).sum(1).min() > 0.9999


def test_get_model_shows_both_checksums(served: tuple[encoder_pb2_grpc.EncoderServiceStub, object],
                                        adapters_dir: Path) -> None:
    stub, _ = served
    import hashlib

    _embed(stub, "efficientnet-lite0+good", _images()[:1])
    info = stub.GetModel(encoder_pb2.GetModelRequest(model="efficientnet-lite0+good")).model
    assert info.loaded and info.dim == 12 and info.base_model == "efficientnet-lite0" and info.adapter == "good"
    assert info.weights_sha256 == LITE0_SHA
    assert info.adapter_sha256 == hashlib.sha256((adapters_dir / "good" / HEAD_FILE).read_bytes()).hexdigest()
    assert list(info.modalities) == [1]  # image only: an image head says nothing about a text tower
    listed = {m.id for m in stub.ListModels(encoder_pb2.ListModelsRequest()).models}
    assert {"efficientnet-lite0+good", "efficientnet-lite0+classifier", "resnet18+for-resnet"} <= listed
    assert not any("not-an-adapter" in m for m in listed)


def test_refusals(served: tuple[encoder_pb2_grpc.EncoderServiceStub, object]) -> None:
    stub, core = served
    one = _images()[:1]
    cases = [
        ("efficientnet-lite0+other-weights", grpc.StatusCode.FAILED_PRECONDITION, "was trained on efficientnet-lite0 "
                                                                                  "weights with SHA-256 0000"),
        ("efficientnet-lite0+damaged", grpc.StatusCode.DATA_LOSS, "the card says"),
        ("efficientnet-lite0+for-resnet", grpc.StatusCode.NOT_FOUND, "was trained on resnet18"),
        ("efficientnet-lite0+absent", grpc.StatusCode.NOT_FOUND, "no adapter 'absent'"),
        ("efficientnet-lite0+good+good", grpc.StatusCode.NOT_FOUND, "not to another adapter"),
        ("efficientnet-lite0+../good", grpc.StatusCode.NOT_FOUND, "not valid"),
    ]
    for model, code, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.EmbedImages(encoder_pb2.EmbedImagesRequest(model=model, images=[encoder_pb2.Image(data=one[0])]))
        assert caught.value.code() == code, (model, caught.value.details())
        assert message in caught.value.details(), (model, caught.value.details())
    # Resolving ids from the directory never adds them to the registry's table.
    registry: Registry = core.registry  # type: ignore[attr-defined]
    before = dict(registry._specs)
    for i in range(50):
        with pytest.raises(Exception, match="no adapter"):
            registry.get(f"efficientnet-lite0+made-up-{i}")
    assert registry._specs == before
