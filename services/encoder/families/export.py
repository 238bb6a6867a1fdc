"""ONNX export of a family's towers: the torch graphs from model input tensor to features.

A *tower* is one input tensor to one (B, dim) feature tensor: the image tower takes normalised
float images (B, 3, crop, crop), the text tower (OpenCLIP) takes int64 tokens (B, L). Every family
exports through the same path: the callables of its ``FamilyModel`` wrapped in a module, so that
what ONNX Runtime runs is exactly what the torch backend runs. Only the batch axis is dynamic.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from services.encoder.families import FamilyModel
from services.encoder.registry import IMAGE, TEXT, ModelSpec

log = logging.getLogger(__name__)

# The default ai.onnx opset of torch's exporter; supported by onnxruntime 1.31 on CPU and CUDA.
OPSET = 18
# Bumped when the export code changes what it writes, so that old cache entries are not reused.
EXPORT_FORMAT = 1
INPUT = "input"
OUTPUT = "features"
# torch.export refuses a dynamic dimension whose range would include 0 or 1 unless it is told so;
# the batch axis is 1..MAX_BATCH (the example has 2 rows, so the graph cannot specialise on it).
MAX_BATCH = 4096


class _Tower(torch.nn.Module):
    """``fn`` as a module, with ``owner`` registered so that its parameters travel with it."""

    def __init__(self, owner: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


@dataclass(frozen=True)
class Tower:
    """One exportable graph of a model.

    Attributes:
        modality: ``image`` or ``text``.
        module: ``forward(x) -> (B, dim)`` features, not yet L2-normalised.
        example: an input of batch 2 on the module's device, for tracing (its values do not matter).
    """

    modality: str
    module: torch.nn.Module
    example: torch.Tensor


def towers(spec: ModelSpec, family: FamilyModel, device: torch.device, dtype: torch.dtype) -> list[Tower]:
    """The image tower, and the text tower when the family splits tokenising from the graph.

    Args:
        spec: the registry entry (input size).
        family: the built network, already on ``device``.
        device: where the module lives (the example input is made there).
        dtype: float dtype of the image input (float32, or float16 for a float16 export).
    """
    crop = spec.preprocess.crop
    out = [Tower(IMAGE, _Tower(family.module, family.embed_images),
                 torch.zeros(2, 3, crop, crop, device=device, dtype=dtype))]
    if TEXT in spec.modalities and family.tokenize is not None and family.embed_tokens is not None:
        tokens = family.tokenize(["a photo of a cat", "a dog"]).to(device)
        out.append(Tower(TEXT, _Tower(family.module, family.embed_tokens), tokens))
    return out


def export_onnx(tower: Tower, path: Path, opset: int = OPSET) -> None:
    """Exports ``tower`` to ``path`` (weights inside the file, or in ``<path>.data`` beyond 2 GB).

    Uses ``torch.onnx.export`` (the ``torch.export`` based exporter) with a dynamic batch axis
    named ``batch``; input ``input``, output ``features``.
    """
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad(), _quiet("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        program = torch.onnx.export(tower.module.eval(), (tower.example,), dynamo=True, opset_version=opset,
                                    input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: batch},), verbose=False)
    if program is None:  # only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export returned no program")
    # Protobuf caps one file at 2 GiB: larger models (ViT-g) keep their weights in a side file.
    large = sum(p.numel() * p.element_size() for p in tower.module.parameters()) > (1 << 31) - (1 << 26)
    program.save(str(path), external_data=large)


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raises these loggers to WARNING for the block: the exporter's passes log one INFO line per
    rewritten initializer (thousands per model), which would drown the service's log."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of every tensor of the state dict.

    Identifies weights that did not come from one file (e.g. a Hugging Face folder of shards).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
