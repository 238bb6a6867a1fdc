"""Adapter models ``<base>+<name>``: the base model's image tower, then the adapter's head (DESIGN §3).

The head (``services.common.adapters``) becomes torch layers inside the model's module, so that every
backend runs base and head as one network: eager torch, and ONNX Runtime, whose export of the image
tower then contains the head (one graph, parity-checked against torch at warm-up like any model).
The output is L2-normalised by the runtime, as for every model.
"""

from __future__ import annotations

import torch
from torch import nn

from services.common import adapters
from services.common.errors import FailedPrecondition
from services.encoder.families import RANDOM_INIT, FamilyModel
from services.encoder.families.export import state_dict_sha256
from services.encoder.registry import ModelSpec


class AdapterHead(nn.Module):
    """``services.common.adapters.Head`` in torch: L2-normalise the base embedding, linear layers with
    the head's activation between them, the softmax of the last when the head's output is ``softmax``."""

    def __init__(self, head: adapters.Head) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for w, b in zip(head.weights, head.biases, strict=True):
            layer = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(w))
                layer.bias.copy_(torch.from_numpy(b))
            self.layers.append(layer)
        self.activation = head.activation
        self.softmax = head.output == "softmax"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.normalize(x.float(), dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1 and self.activation == "relu":
                h = nn.functional.relu(h)
            elif i < len(self.layers) - 1 and self.activation == "gelu":
                h = nn.functional.gelu(h)
        return torch.softmax(h, dim=1) if self.softmax else h


class _WithHead(nn.Module):
    """The base network and the head in one module (parameters and ``.to()`` travel together)."""

    def __init__(self, base: nn.Module, head: AdapterHead) -> None:
        super().__init__()
        self.base = base
        self.head = head


def base_checksum(family: FamilyModel) -> str:
    """The SHA-256 an adapter card names its base weights by: the weights file's, or (weights that are
    not one file) the state dict's, as the export cache also identifies them."""
    return family.weights_sha256 or state_dict_sha256(family.module)


def attach(spec: ModelSpec, base: FamilyModel) -> FamilyModel:
    """``base`` with the adapter of ``spec`` after its image tower.

    Raises:
        FailedPrecondition: the base weights are not the ones the adapter was trained on (or are
            random-initialised).
        DataLoss: the head file is corrupt or does not match its card.
    """
    ref = spec.adapter
    if ref is None:
        raise ValueError(f"model {spec.id} has no adapter")
    if base.weights_source == RANDOM_INIT:
        raise FailedPrecondition(f"model {spec.id}: the base model {ref.base_model} has random-initialised weights "
                                 "here (--random-weights); an adapter only applies to the weights it was trained on")
    actual = base_checksum(base)
    if actual != ref.base_weights_sha256:
        raise FailedPrecondition(
            f"model {spec.id}: adapter {ref.name} was trained on {ref.base_model} weights with SHA-256 "
            f"{ref.base_weights_sha256}, but this server's {ref.base_model} weights have SHA-256 {actual}; retrain "
            f"the adapter on these weights (retrieval adapt train) or serve the weights it was trained on")
    card = adapters.read_card(ref.directory)
    head, digest = adapters.read_head(ref.directory, card)
    module = _WithHead(base.module, AdapterHead(head).eval())
    base_embed = base.embed_images

    def embed_images(x: torch.Tensor) -> torch.Tensor:
        return module.head(base_embed(x))

    return FamilyModel(module, embed_images, None, base.weights_source, base.weights_sha256 or actual,
                       channels_last=base.channels_last, adapter_sha256=digest)
