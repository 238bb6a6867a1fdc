"""DINOv2 ViTs through transformers' ``Dinov2Model``; the embedding is the normalised CLS token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.encoder.families import (
    RANDOM_INIT,
    FamilyModel,
    LoadContext,
    WeightsMissing,
    sha256_file,
)
from services.encoder.registry import ModelSpec

# Architectures of the released checkpoints, so random-init builds need no hub lookup.
ARCHS: dict[str, dict[str, Any]] = {
    "facebook/dinov2-small": {"hidden_size": 384, "num_attention_heads": 6, "num_hidden_layers": 12},
    "facebook/dinov2-base": {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12},
    "facebook/dinov2-large": {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24},
    "facebook/dinov2-giant": {"hidden_size": 1536, "num_attention_heads": 24, "num_hidden_layers": 40,
                              "mlp_ratio": 4.0, "use_swiglu_ffn": True},
}


def load(spec: ModelSpec, ctx: LoadContext) -> FamilyModel:
    from transformers import Dinov2Config, Dinov2Model

    hub_id = spec.weights.get("hub_id", "")
    if ctx.random_weights:
        config = Dinov2Config(patch_size=14, image_size=518,
                              **{**ARCHS.get(hub_id, {}), **spec.params.get("config", {})})
        model = Dinov2Model(config)
        source, digest = RANDOM_INIT, ""
    else:
        local = ctx.local_override(spec)
        source = str(local) if local is not None else hub_id
        try:
            model = Dinov2Model.from_pretrained(source, local_files_only=ctx.offline or local is not None)
        except OSError as exc:
            raise WeightsMissing(
                f"model {spec.id}: weights {hub_id!r} not found in the Hugging Face cache and downloads "
                f"are off (offline); run `hf download {hub_id}` where there is internet and copy the "
                f"cache (HF_HOME), or save the model to <ENCODER_WEIGHTS_DIR>/{spec.id}/ ({exc})"
            ) from exc
        digest = _checkpoint_sha256(local, hub_id)
    model.eval()

    def embed_images(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).pooler_output  # layer-normed CLS token

    return FamilyModel(model, embed_images, None, source, digest)


def _checkpoint_sha256(local: Path | None, hub_id: str) -> str:
    if local is not None:
        files = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
        return sha256_file(files[0]) if files else ""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, name)
        if isinstance(path, str):
            return sha256_file(Path(path))
    return ""
