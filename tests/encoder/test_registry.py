"""The model registry: entries are data, open_clip ids resolve on demand, unknown ids are NOT_FOUND."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from services.common.errors import NotFound
from services.encoder.registry import DEFAULT_MODEL, Registry


def test_default_and_required_models_are_registered() -> None:
    reg = Registry()
    expected = {"efficientnet-lite0": 1280, "efficientnet-lite2": 1280, "resnet18": 512, "resnet34": 512,
                "resnet50": 2048, "dinov2-vits14": 384, "dinov2-vitb14": 768, "clip-vit-b-32": 512}
    for model_id, dim in expected.items():
        assert reg.get(model_id).dim == dim
    assert DEFAULT_MODEL == "efficientnet-lite0"
    lite0 = reg.get("efficientnet-lite0").preprocess
    assert (lite0.resize, lite0.crop, lite0.interpolation, lite0.mean, lite0.std) == (
        256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert reg.get("efficientnet-lite2").preprocess.crop == 260
    assert "text" in reg.get("clip-vit-b-32").modalities
    assert "text" not in reg.get("resnet18").modalities


def test_openclip_ids_resolve_from_open_clip_configs() -> None:
    spec = Registry().get("openclip:ViT-B-16/laion2b_s34b_b88k")
    assert spec.family == "openclip" and spec.dim == 512 and spec.params["arch"] == "ViT-B-16"
    assert spec.preprocess.crop == 224 and "text" in spec.modalities


@pytest.mark.parametrize("model_id", ["no-such-model", "openclip:NoSuchArch/openai", "openclip:bad"])
def test_unknown_models_are_not_found(model_id: str) -> None:
    with pytest.raises(NotFound, match="model"):
        Registry().get(model_id)


def test_openclip_ids_carry_open_clips_resize_mode() -> None:
    """SigLIP's "squash" was lost: every openclip id became resize + centre crop (issue 10)."""
    assert Registry().get("openclip:ViT-B-16-SigLIP/webli").preprocess.resize_mode == "squash"
    assert Registry().get("openclip:ViT-B-32/openai").preprocess.resize_mode == "shortest"


def test_a_weights_file_with_the_wrong_checksum_is_data_loss(tmp_path: Path) -> None:
    """A corrupt weights file was INVALID_ARGUMENT, as if the caller had sent something wrong."""
    from services.common.errors import DataLoss
    from services.encoder.config import EncoderSettings
    from services.encoder.core import EncoderCore

    (tmp_path / "efficientnet-lite0.pth").write_bytes(b"not the real weights")
    core = EncoderCore(EncoderSettings(models=[], weights_dir=tmp_path, metrics_port=-1, port=0))
    try:
        with pytest.raises(DataLoss) as err:
            core.runtime("efficientnet-lite0")
        assert err.value.code == grpc.StatusCode.DATA_LOSS
        assert "efficientnet-lite0.pth has SHA-256" in err.value.message and "expected 57934424" in err.value.message
    finally:
        core.close()
