"""A server from the shared factory over a controllable fake ``EncoderService`` (no model)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.errors import ResourceExhausted
from services.common.server import RunningServer, ServiceRegistration, create_server
from services.common.settings import ServerSettings

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]


@dataclass
class FakeEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    """``ListModels`` answers at once; ``GetModel`` blocks until ``release`` is set; streams echo
    until the client ends; ``EmbedTexts`` raises a load-shedding error with a retry hint."""

    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    stream_errors: list[BaseException] = field(default_factory=list)

    def ListModels(self, request: encoder_pb2.ListModelsRequest,
                   context: grpc.ServicerContext) -> encoder_pb2.ListModelsResponse:
        return encoder_pb2.ListModelsResponse()

    def GetModel(self, request: encoder_pb2.GetModelRequest,
                 context: grpc.ServicerContext) -> encoder_pb2.GetModelResponse:
        self.entered.release()
        self.release.wait(30)
        return encoder_pb2.GetModelResponse(model=encoder_pb2.ModelInfo(id=request.model))

    def EmbedTexts(self, request: encoder_pb2.EmbedTextsRequest,
                   context: grpc.ServicerContext) -> encoder_pb2.EmbedTextsResponse:
        raise ResourceExhausted("queue full", retry_after=1.5)

    def StreamEmbedImages(self, request_iterator: Iterator[encoder_pb2.StreamEmbedImagesRequest],
                          context: grpc.ServicerContext) -> Iterator[encoder_pb2.StreamEmbedImagesResponse]:
        for request in request_iterator:
            yield encoder_pb2.StreamEmbedImagesResponse(model=request.model)


@pytest.fixture
def fake_server() -> Iterator[tuple[RunningServer, FakeEncoder, ServerSettings]]:
    yield from serve_fake(ServerSettings(port=0, metrics_port=-1, grpc_workers=4, max_concurrent_rpcs=6,
                                         max_concurrent_streams=3, auth_token="s3cret"))


def serve_fake(settings: ServerSettings) -> Iterator[tuple[RunningServer, FakeEncoder, ServerSettings]]:
    fake = FakeEncoder()
    running = create_server(settings, [ServiceRegistration(
        SERVICE, lambda srv: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(fake, srv))])
    running.set_serving(True)
    try:
        yield running, fake, settings
    finally:
        fake.release.set()
        running.stop(0)
