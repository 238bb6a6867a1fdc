"""OpenCLIP models (open_clip_torch): image and text towers in one embedding space."""

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


def load(spec: ModelSpec, ctx: LoadContext) -> FamilyModel:
    import open_clip

    arch = spec.params["arch"]
    pretrained = spec.weights.get("pretrained", "")
    # OpenAI's checkpoints were trained with QuickGELU; a random build keeps the same graph.
    kwargs: dict[str, Any] = {"force_quick_gelu": pretrained == "openai"}
    if ctx.random_weights:
        model = open_clip.create_model(arch, pretrained=None, **kwargs)
        source, digest = RANDOM_INIT, ""
    else:
        local = ctx.local_override(spec, (".safetensors", ".bin", ".pt", ".pth"))
        try:
            if local is not None:
                model = open_clip.create_model(arch, pretrained=str(local), **kwargs)
                source, digest = str(local), sha256_file(local)
            else:
                cfg = open_clip.get_pretrained_cfg(arch, pretrained)
                if not cfg:
                    raise WeightsMissing(f"model {spec.id}: open_clip has no pretrained tag "
                                         f"{pretrained!r} for {arch}")
                path = open_clip.download_pretrained(cfg)
                model = open_clip.create_model(arch, pretrained=path, **kwargs)
                source, digest = path, sha256_file(Path(path))
        except WeightsMissing:
            raise
        except Exception as exc:
            if not ctx.offline:
                raise
            raise WeightsMissing(
                f"model {spec.id}: open_clip weights {arch}/{pretrained} are not in the local cache and "
                f"downloads are off (offline); fetch them where there is internet (open_clip "
                f"cache / HF_HOME) or put the file at <ENCODER_WEIGHTS_DIR>/"
                f"{spec.id.replace(':', '_').replace('/', '_')}.safetensors ({type(exc).__name__}: {exc})") from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts)

    def embed_texts(texts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        return model.encode_text(tokenize(texts).to(device))

    return FamilyModel(model, model.encode_image, embed_texts, source, digest,
                       tokenize=tokenize, embed_tokens=model.encode_text)
