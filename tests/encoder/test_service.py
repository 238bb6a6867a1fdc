"""The encoder over a real gRPC channel: contract, health, reflection, status codes, metrics."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from retrieval.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

from services.common.clients import channel, wait_serving
from services.common.server import RunningServer
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore
from services.encoder.servicer import create_encoder_server
from tests.encoder.conftest import MAX_MESSAGE, start_server
from tests.encoder.images import jpeg, png_bomb


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_embed_images_returns_unit_vectors_with_ids(real: tuple[RunningServer, object]) -> None:
    _, stub = real
    response = stub.EmbedImages(encoder_pb2.EmbedImagesRequest(  # type: ignore[attr-defined]
        images=[encoder_pb2.Image(data=jpeg(), id="a.jpg"), encoder_pb2.Image(data=jpeg(640, 480))]))
    assert response.model == "efficientnet-lite0" and response.dim == 1280
    assert [r.id for r in response.results] == ["a.jpg", "1"]
    for result in response.results:
        vec = np.asarray(result.vector.values)
        assert vec.shape == (1280,) and abs(np.linalg.norm(vec) - 1) < 1e-5


def test_per_item_errors_do_not_sink_the_batch(real: tuple[RunningServer, object]) -> None:
    _, stub = real
    images = [jpeg(), b"", b"not an image", jpeg()[:2500], png_bomb(), jpeg()]
    response = stub.EmbedImages(encoder_pb2.EmbedImagesRequest(  # type: ignore[attr-defined]
        images=[encoder_pb2.Image(data=d) for d in images]))
    kinds = [r.WhichOneof("result") for r in response.results]
    assert kinds == ["vector", "error", "error", "error", "error", "vector"]
    codes = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert [r.error.code for r in response.results[1:5]] == [c.value[0] for c in codes]
    assert response.results[1].error.message.startswith("image 1 of 6: empty")
    assert "decompression bomb" in response.results[4].error.message


def test_request_level_errors_have_precise_codes(real: tuple[RunningServer, object],
                                                 plumbing: object) -> None:
    _, stub = real
    request = encoder_pb2.EmbedImagesRequest
    assert _code(lambda: stub.EmbedImages(request())) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore
    assert _code(lambda: stub.EmbedImages(request(model="nope", images=[encoder_pb2.Image(data=jpeg())]))) \
        == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    huge = request(images=[encoder_pb2.Image(data=b"\xff" * (MAX_MESSAGE + 1))])
    assert _code(lambda: stub.EmbedImages(huge)) == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore
    texts = encoder_pb2.EmbedTextsRequest(texts=["a cat"])
    assert _code(lambda: stub.EmbedTexts(texts)) == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore
    assert _code(lambda: stub.GetModel(encoder_pb2.GetModelRequest(model="nope"))) \
        == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    # ...and the server keeps serving.
    ok = stub.EmbedImages(request(images=[encoder_pb2.Image(data=jpeg())]))  # type: ignore[attr-defined]
    assert ok.results[0].WhichOneof("result") == "vector"


def test_over_long_text_is_a_per_item_error(plumbing: encoder_pb2_grpc.EncoderServiceStub) -> None:
    response = plumbing.EmbedTexts(encoder_pb2.EmbedTextsRequest(texts=["a photo of a cat", "y" * 100_000]))
    assert response.dim == 512 and len(response.results[0].vector.values) == 512
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "100000 characters" in response.results[1].error.message


def test_stream_answers_in_order_with_pipelining(real: tuple[RunningServer, object]) -> None:
    _, stub = real
    sizes = [(200 + 40 * i, 160 + 10 * i) for i in range(12)]
    requests = (encoder_pb2.StreamEmbedImagesRequest(images=[encoder_pb2.Image(data=jpeg(w, h), id=f"{i}-{w}")])
                for i, (w, h) in enumerate(sizes))
    responses = list(stub.StreamEmbedImages(requests))  # type: ignore[attr-defined]
    assert [r.results[0].id for r in responses] == [f"{i}-{w}" for i, (w, _) in enumerate(sizes)]
    single = stub.EmbedImages(encoder_pb2.EmbedImagesRequest(  # type: ignore[attr-defined]
        images=[encoder_pb2.Image(data=jpeg(*sizes[5]))]))
    np.testing.assert_allclose(responses[5].results[0].vector.values, single.results[0].vector.values, atol=1e-5)


def test_stream_with_an_unknown_model_fails_with_not_found(real: tuple[RunningServer, object]) -> None:
    _, stub = real
    requests = iter([encoder_pb2.StreamEmbedImagesRequest(model="nope", images=[encoder_pb2.Image(data=jpeg())])])
    assert _code(lambda: list(stub.StreamEmbedImages(requests))) == grpc.StatusCode.NOT_FOUND  # type: ignore


def test_models_describe_preprocessing_device_and_weights(real: tuple[RunningServer, object]) -> None:
    _, stub = real
    models = {m.id: m for m in stub.ListModels(encoder_pb2.ListModelsRequest()).models}  # type: ignore
    assert {"efficientnet-lite0", "efficientnet-lite2", "resnet50", "dinov2-vits14", "clip-vit-b-32"} <= set(models)
    info = stub.GetModel(encoder_pb2.GetModelRequest(model="efficientnet-lite0")).model  # type: ignore
    assert info.loaded and info.device == "cpu" and info.dtype == "float32" and info.dim == 1280
    assert info.preprocessing.resize == 256 and info.preprocessing.crop == 224
    assert list(info.preprocessing.mean) == [0.5, 0.5, 0.5] and info.preprocessing.interpolation == "bicubic"
    assert len(info.weights_sha256) == 64 and info.weights_source.endswith("efficientnet-lite0-57934424.pth")
    assert list(models["clip-vit-b-32"].modalities) == [common_pb2.MODALITY_IMAGE, common_pb2.MODALITY_TEXT]
    assert not models["resnet50"].loaded


def test_deadline_is_honoured(real: tuple[RunningServer, object]) -> None:
    _, stub = real
    many = encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=jpeg(1600, 1200))] * 200)
    assert _code(lambda: stub.EmbedImages(many, timeout=0.05)) == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore


def test_health_reflection_and_metrics(real: tuple[RunningServer, object]) -> None:
    running, stub = real
    chan = channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(chan)
    for service in ("", "retrieval.v1.EncoderService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(chan)
    answer = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    assert "retrieval.v1.EncoderService" in {s.name for s in answer.list_services_response.service}
    chan.close()
    stub.EmbedImages(encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=jpeg())]))  # type: ignore
    text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
    assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="EmbedImages",'
            'grpc_service="retrieval.v1.EncoderService",grpc_type="unary"}') in text
    assert 'grpc_code="DATA_LOSS",grpc_method="GetModel"' in text  # series pre-created at zero
    assert 'encoder_batch_size_count{modality="image",model="efficientnet-lite0"}' in text
    # The default backend on a CPU is ONNX Runtime; every stage of the model carries it.
    for stage in ("decode", "queue", "forward"):
        assert ('encoder_inference_duration_seconds_count{backend="onnxruntime",model="efficientnet-lite0",'
                f'stage="{stage}"}}') in text


def test_health_is_not_serving_until_models_are_warm() -> None:
    gate = threading.Event()
    settings = EncoderSettings(port=0, metrics_port=-1, models=["resnet18"], random_weights=True)
    original = EncoderCore.preload

    def slow_preload(self: EncoderCore) -> None:
        gate.wait(10)
        original(self)

    EncoderCore.preload = slow_preload  # type: ignore[method-assign]
    try:
        running, core = create_encoder_server(settings)
        chan = channel(f"127.0.0.1:{running.port}")
        health = health_pb2_grpc.HealthStub(chan)
        check = health_pb2.HealthCheckRequest(service="retrieval.v1.EncoderService")
        assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        wait_serving(chan, "retrieval.v1.EncoderService", timeout=60)
        chan.close()
        running.stop(0)
        core.close()
    finally:
        EncoderCore.preload = original  # type: ignore[method-assign]


def test_bearer_token_is_required_but_health_stays_open() -> None:
    running, core, chan = start_server(models=[], random_weights=True, auth_token="s3cret")
    try:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        request = encoder_pb2.ListModelsRequest()
        assert _code(lambda: stub.ListModels(request)) == grpc.StatusCode.UNAUTHENTICATED
        bad = (("authorization", "Bearer wrong"),)
        assert _code(lambda: stub.ListModels(request, metadata=bad)) == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ListModels(request, metadata=(("authorization", "Bearer s3cret"),)).models
    finally:
        chan.close()
        running.stop(0)
        core.close()


def test_graceful_stop_finishes_in_flight_calls(real: tuple[RunningServer, object]) -> None:
    running, core, chan = start_server(models=["resnet18"], default_model="resnet18", random_weights=True)
    stub = encoder_pb2_grpc.EncoderServiceStub(chan)
    request = encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=jpeg(1200, 900))] * 24)
    future = stub.EmbedImages.future(request)
    time.sleep(0.2)
    running.stop(grace=30)
    assert len(future.result(timeout=60).results) == 24
    chan.close()
    core.close()
