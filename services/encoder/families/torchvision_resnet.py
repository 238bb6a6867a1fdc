"""torchvision ResNets with the final fully connected layer removed (pooled features)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from services.encoder.families import (
    RANDOM_INIT,
    FamilyModel,
    LoadContext,
    WeightsMissing,
    verified_sha256,
)
from services.encoder.registry import ModelSpec


def weights_file(spec: ModelSpec, ctx: LoadContext) -> Path:
    """``<weights_dir>/<id>.pth``, else torch hub's cache (downloaded there unless offline)."""
    import torchvision

    override = ctx.local_override(spec, (".pth", ".pt"))
    if override is not None and override.is_file():
        return override
    enum_name, member = spec.weights["torchvision"].split(".")
    url: str = getattr(getattr(torchvision.models, enum_name), member).url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return cached
    if ctx.offline:
        raise WeightsMissing(
            f"model {spec.id}: weights file {cached} not found and downloads are off (offline); "
            f"download {url} to {cached} (or to <ENCODER_WEIGHTS_DIR>/{spec.id}.pth)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(cached), progress=False)
    return cached


def load(spec: ModelSpec, ctx: LoadContext) -> FamilyModel:
    import torchvision

    model = getattr(torchvision.models, spec.params["arch"])(weights=None)
    source, digest = RANDOM_INIT, ""
    if not ctx.random_weights:
        path = weights_file(spec, ctx)
        digest = verified_sha256(spec, path)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        source = str(path)
    model.fc = torch.nn.Identity()
    model.eval()
    return FamilyModel(model, model, None, source, digest, channels_last=True)
