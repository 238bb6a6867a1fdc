"""``retrieval adapt train``: the job behind the command (the CLI only parses flags and calls this)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.adapters.data import embed_catalogue, read_catalogue
from services.adapters.search import SearchSettings, TrainedAdapter, train_adapter
from services.common.clients import EncoderClient, Endpoint
from services.common.errors import FailedPrecondition
from services.evaluator.cache import EmbeddingCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """What ``retrieval adapt train`` was asked.

    Attributes:
        dataset: dataset root (``list_of_images.txt`` or class folders).
        catalogue: the catalogue list relative to the root (empty: the whole dataset).
        encoder: the base model id.
        out: the adapter's directory; its name is the adapter's name (``<encoder>+<name>``).
        encoder_endpoint: the encoder service, to embed what the cache lacks and to read the base
            weights' checksum; None: cache only, checksum from the model registry.
        cache_dir: the evaluator's embedding cache.
        settings: search budget and seeds.
    """

    dataset: Path
    catalogue: str
    encoder: str
    out: Path
    encoder_endpoint: Endpoint | None
    cache_dir: Path
    settings: SearchSettings


def base_checksum(model: str, client: EncoderClient | None) -> str:
    """The SHA-256 of the base model's weights: as the encoder service reports them, or from the
    registry when there is no service to ask.

    Raises:
        FailedPrecondition: no service, and the registry has no checksum for the model.
    """
    if client is not None:
        info = client.model(model)
        if not info.weights_sha256:
            raise FailedPrecondition(f"the encoder reports no weights checksum for {model} (weights source "
                                     f"{info.weights_source!r}); an adapter must name the weights it was trained on")
        return str(info.weights_sha256) if info.weights_source != "random-init" else "random-init"
    from services.encoder.registry import Registry  # data only, no torch

    sha = Registry().get(model).sha256
    if not sha:
        raise FailedPrecondition(f"model {model} has no registered weights checksum; give --encoder-address so "
                                 "that the encoder service reports the checksum of the weights it serves")
    return sha


def train(request: TrainRequest) -> TrainedAdapter:
    """Reads the catalogue, gets its embeddings, searches and writes the adapter."""
    def say(message: str) -> None:
        print(message, flush=True)

    allowed = [request.dataset.resolve()]
    checked = read_catalogue(request.dataset, request.catalogue, allowed)
    client = EncoderClient(request.encoder_endpoint) if request.encoder_endpoint is not None else None
    try:
        if client is not None:
            client.wait_ready(timeout=request.encoder_endpoint.timeout if request.encoder_endpoint else 300)
        weights = base_checksum(request.encoder, client)
        catalogue = embed_catalogue(checked, request.encoder, weights, EmbeddingCache(request.cache_dir), client)
    finally:
        if client is not None:
            client.close()
    say(f"catalogue: {len(catalogue.labels)} images, {len(catalogue.classes)} classes, {request.encoder} "
        f"embeddings from the {catalogue.source} in {catalogue.seconds:.1f} s ({len(catalogue.excluded)} excluded)")
    description = {"name": checked.dataset.name, "root": str(checked.dataset.root),
                   "catalogue": request.catalogue or "(the whole dataset)"}
    return train_adapter(catalogue, name=request.out.name, out=request.out, base_model=request.encoder,
                         base_weights_sha256=weights, settings=request.settings, dataset_description=description,
                         progress=say)
