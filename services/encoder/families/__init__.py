"""Model families: the code that builds a network and loads its weights for a registry entry.

Each family module has ``load(spec, ctx) -> FamilyModel``; ``LOADERS`` maps family names to them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from services.encoder.registry import ModelSpec

RANDOM_INIT = "random-init"


class WeightsMissing(FailedPrecondition):
    """The weights of a model are not on this machine (and may not be downloaded)."""


@dataclass(frozen=True)
class LoadContext:
    """How a loader may find weights.

    Attributes:
        weights_dir: searched first: ``<dir>/<model-id>.<ext>`` or ``<dir>/<model-id>/``.
        offline: never download (Hugging Face offline mode, no torch hub downloads).
        random_weights: build the network with random weights (plumbing and speed tests only).
    """

    weights_dir: Path | None = None
    offline: bool = True
    random_weights: bool = False

    def local_override(self, spec: ModelSpec, suffixes: tuple[str, ...] = ()) -> Path | None:
        """``<weights_dir>/<model-id>`` as a directory, or as a file with one of ``suffixes``."""
        if self.weights_dir is None:
            return None
        base = self.weights_dir / spec.id.replace("/", "_").replace(":", "_")
        if base.is_dir():
            return base
        for suffix in suffixes:
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
        return None


@dataclass
class FamilyModel:
    """A built network, ready to be moved to a device.

    Attributes:
        module: the network (for ``.to(device)`` and ``.eval()``).
        embed_images: normalised float images (B, 3, H, W) to features (B, dim), not yet L2-normalised.
        embed_texts: texts to features (B, dim), for models with a text tower.
        weights_source: where the weights came from, or ``random-init``.
        weights_sha256: SHA-256 (hex) of the weights file, empty when there is no single file.
        channels_last: run in NHWC memory format (convolutional nets: about 2x faster on CPU,
            tensor-core friendly on GPU).
        tokenize: texts to a token tensor (B, L) of int64, for models with a text tower; with
            ``embed_tokens`` it splits ``embed_texts`` into the Python part and the graph that
            other backends (ONNX Runtime) run.
        embed_tokens: token tensor (B, L) to features (B, dim), not yet L2-normalised.
    """

    module: torch.nn.Module
    embed_images: Callable[[torch.Tensor], torch.Tensor]
    embed_texts: Callable[[list[str]], torch.Tensor] | None
    weights_source: str
    weights_sha256: str
    channels_last: bool = False
    tokenize: Callable[[list[str]], torch.Tensor] | None = None
    embed_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verified_sha256(spec: ModelSpec, path: Path) -> str:
    """The file's SHA-256, refusing a file that does not match the registry's checksum (DATA_LOSS:
    the server's own file is corrupt or wrong; nothing the caller sent is at fault)."""
    digest = sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        raise DataLoss(f"model {spec.id}: weights file {path} has SHA-256 {digest}, "
                       f"expected {spec.sha256} (corrupt or wrong file)")
    return digest


def _loaders() -> dict[str, Callable[[ModelSpec, LoadContext], FamilyModel]]:
    from services.encoder.families import dinov2, efficientnet_lite, openclip, torchvision_resnet

    return {
        "efficientnet_lite": efficientnet_lite.load,
        "torchvision_resnet": torchvision_resnet.load,
        "dinov2": dinov2.load,
        "openclip": openclip.load,
    }


def load_family_model(spec: ModelSpec, ctx: LoadContext) -> FamilyModel:
    """Builds the network of ``spec`` with its weights (or random ones when asked)."""
    loaders = _loaders()
    if spec.family not in loaders:
        raise InvalidArgument(f"model {spec.id}: unknown family {spec.family!r}; known: {sorted(loaders)}")
    return loaders[spec.family](spec, ctx)
