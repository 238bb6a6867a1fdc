"""Model families with random weights: shapes, unit norms, batching, text tower, error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore, InProcessEncoder, ModelRuntime
from services.encoder.families import RANDOM_INIT, FamilyModel
from services.encoder.metrics import EncoderMetrics
from services.encoder.registry import ModelSpec, Preprocess
from tests.encoder.images import encode, gradient, jpeg


def _images(n: int) -> list[bytes]:
    return [encode(gradient(200 + 17 * i, 150 + 11 * i), "JPEG", quality=90) for i in range(n)]


@pytest.mark.parametrize(("model_id", "dim"), [("clip-vit-b-32", 512), ("dinov2-tiny", 32), ("resnet18", 512)])
def test_families_embed_unit_vectors_of_their_dimension(random_core: EncoderCore, model_id: str,
                                                        dim: int) -> None:
    runtime, outcomes = random_core.embed_images(model_id, _images(5))
    assert runtime.spec.dim == dim and runtime.family.weights_source == RANDOM_INIT
    vectors = np.stack([o for o in outcomes if isinstance(o, np.ndarray)])
    assert vectors.shape == (5, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.ptp(vectors, axis=0).max() > 0  # different images, different vectors


def test_batched_and_single_results_agree(random_core: EncoderCore) -> None:
    data = _images(6)
    together = random_core.embed_images("resnet18", data)[1]
    alone = [random_core.embed_images("resnet18", [d])[1][0] for d in data]
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-4)


def test_clip_text_tower(random_core: EncoderCore) -> None:
    _, outcomes = random_core.embed_texts("clip-vit-b-32", ["a photo of a cat", "a photo of a dog", ""])
    vectors = np.stack(outcomes)
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_over_long_text_fails_alone(random_core: EncoderCore) -> None:
    _, outcomes = random_core.embed_texts("clip-vit-b-32", ["short", "x" * 5000])
    assert isinstance(outcomes[0], np.ndarray)
    assert isinstance(outcomes[1], InvalidArgument) and "text 1 of 2: 5000 characters" in outcomes[1].message


def test_text_on_an_image_only_model_is_invalid(random_core: EncoderCore) -> None:
    with pytest.raises(InvalidArgument, match="images only"):
        random_core.embed_texts("resnet18", ["a cat"])


def test_bad_items_fail_alone_and_are_located(random_core: EncoderCore) -> None:
    data = [jpeg(), b"", b"garbage", jpeg()[:3000], jpeg()]
    _, outcomes = random_core.embed_images("resnet18", data)
    assert isinstance(outcomes[0], np.ndarray) and isinstance(outcomes[4], np.ndarray)
    errors = outcomes[1:4]
    assert all(isinstance(e, InvalidArgument) for e in errors)
    assert [e.message.split(":")[0] for e in errors if isinstance(e, ServiceError)] == [
        "image 1 of 5", "image 2 of 5", "image 3 of 5"]


def test_request_limits(random_core: EncoderCore) -> None:
    with pytest.raises(InvalidArgument, match="no images"):
        random_core.embed_images("resnet18", [])
    too_many = random_core.settings.max_images_per_request + 1
    with pytest.raises(ResourceExhausted, match="split the batch"):
        random_core.embed_images("resnet18", [b"x"] * too_many)


def test_in_process_encoder_protocol(random_core: EncoderCore) -> None:
    encoder = InProcessEncoder(random_core, "resnet18")
    assert encoder.model_id == "resnet18" and encoder.dim == 512
    assert encoder.embed_images([jpeg()])[0].shape == (512,)


def _runtime_with(embed: object, dim: int = 4, batch: int = 8) -> ModelRuntime:
    spec = ModelSpec(id="fake", family="fake", dim=dim, preprocess=Preprocess(resize=8, crop=8))
    family = FamilyModel(torch.nn.Identity(), embed, None, RANDOM_INIT, "")  # type: ignore[arg-type]
    settings = EncoderSettings(max_batch_size=batch, max_batch_delay_ms=1, metrics_port=-1)
    return ModelRuntime(spec, family, torch.device("cpu"), torch.float32, settings,
                        EncoderMetrics(CollectorRegistry()))


def test_non_finite_output_is_an_error_for_that_item_only() -> None:
    def embed(x: torch.Tensor) -> torch.Tensor:
        out = torch.ones(x.shape[0], 4)
        out[x[:, 0, 0, 0] > 0] = float("nan")  # bright first pixel -> NaN
        return out

    runtime = _runtime_with(embed)
    try:
        dark, bright = torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((3, 8, 8), 255, dtype=torch.uint8)
        outcomes = runtime._run_images([dark, bright, dark])
        assert isinstance(outcomes[1], ServiceError) and "non-finite" in outcomes[1].message
        np.testing.assert_allclose(outcomes[0], [0.5, 0.5, 0.5, 0.5])
    finally:
        runtime.close()


def test_device_out_of_memory_splits_the_batch() -> None:
    seen: list[int] = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return torch.ones(x.shape[0], 4)

    runtime = _runtime_with(embed)
    try:
        outcomes = runtime._run_images([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 8)
        assert all(isinstance(o, np.ndarray) for o in outcomes) and len(outcomes) == 8
        assert seen == [8, 4, 2, 2, 4, 2, 2]
    finally:
        runtime.close()


def test_saturated_model_refuses_whole_requests() -> None:
    settings = EncoderSettings(random_weights=True, models=[], max_queue_items=4, metrics_port=-1)
    core = EncoderCore(settings)
    try:
        runtime = core.runtime("resnet18")
        with pytest.raises(ResourceExhausted, match="saturated"):
            core.embed_images("resnet18", [jpeg()] * 5)
        assert runtime.in_progress == 0  # nothing admitted, nothing leaked
        assert len(core.embed_images("resnet18", [jpeg()] * 4)[1]) == 4
        assert runtime.in_progress == 0
    finally:
        core.close()
