"""Encoder fixtures: cores with random-initialised models (plumbing) and with real weights."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from retrieval.v1 import encoder_pb2_grpc

from services.common.clients import channel, wait_serving
from services.common.server import RunningServer
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore
from services.encoder.registry import ModelSpec, Preprocess, Registry
from services.encoder.servicer import create_encoder_server

MAX_MESSAGE = 8 * 1024 * 1024

# A DINOv2 of the real family code with a tiny configuration: seconds, not minutes, offline.
TINY_DINOV2 = ModelSpec(
    id="dinov2-tiny", family="dinov2", dim=32, preprocess=Preprocess(resize=256, crop=224),
    weights={"hub_id": "facebook/dinov2-small"},
    params={"config": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}},
)


def plumbing_registry() -> Registry:
    registry = Registry()
    registry.register(TINY_DINOV2)
    return registry


@pytest.fixture(scope="module")
def random_core() -> Iterator[EncoderCore]:
    """A core whose models are random-initialised (shapes and batching only, never quality)."""
    settings = EncoderSettings(random_weights=True, models=[], max_batch_size=8, max_batch_delay_ms=2,
                               metrics_port=-1, port=0)
    core = EncoderCore(settings, registry=plumbing_registry())
    yield core
    core.close()


def start_server(**overrides: object) -> tuple[RunningServer, EncoderCore, grpc.Channel]:
    """An encoder server on a free port (metrics too), SERVING, and a channel to it."""
    settings = EncoderSettings(port=0, metrics_port=0, max_message_bytes=MAX_MESSAGE, max_batch_delay_ms=2,
                               **overrides)  # type: ignore[arg-type]
    running, core = create_encoder_server(settings, registry=plumbing_registry())
    chan = channel(f"127.0.0.1:{running.port}")
    wait_serving(chan, timeout=120)
    return running, core, chan


@pytest.fixture(scope="session")
def real() -> Iterator[tuple[RunningServer, encoder_pb2_grpc.EncoderServiceStub]]:
    """A server with the real EfficientNet-Lite0 preloaded."""
    running, core, chan = start_server(models=["efficientnet-lite0"])
    yield running, encoder_pb2_grpc.EncoderServiceStub(chan)
    chan.close()
    running.stop(0)
    core.close()


@pytest.fixture(scope="module")
def plumbing() -> Iterator[encoder_pb2_grpc.EncoderServiceStub]:
    """A server with random-initialised CLIP (text tower) for plumbing checks."""
    running, core, chan = start_server(models=["clip-vit-b-32"], default_model="clip-vit-b-32", random_weights=True)
    yield encoder_pb2_grpc.EncoderServiceStub(chan)
    chan.close()
    running.stop(0)
    core.close()
