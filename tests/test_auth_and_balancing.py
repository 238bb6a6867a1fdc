"""Bearer tokens between services, and connection ageing for client-side load balancing."""

from __future__ import annotations

import time

import grpc
import pytest
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

from services.common.clients import EncoderClient, Endpoint, channel, wait_serving
from services.encoder.config import EncoderSettings
from services.encoder.servicer import create_encoder_server


def test_clients_with_the_token_pass_and_others_are_refused() -> None:
    settings = EncoderSettings(port=0, metrics_port=-1, models=[], random_weights=True, auth_token="t0ken")
    running, core = create_encoder_server(settings)
    address = f"127.0.0.1:{running.port}"
    try:
        with channel(address) as chan:
            wait_serving(chan, timeout=30)  # health needs no token (kubelet probes cannot send one)
            with pytest.raises(grpc.RpcError) as err:
                encoder_pb2_grpc.EncoderServiceStub(chan).ListModels(encoder_pb2.ListModelsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with channel(address, token="t0ken") as chan:
            stub = encoder_pb2_grpc.EncoderServiceStub(chan)
            assert stub.ListModels(encoder_pb2.ListModelsRequest()).models
            # Streams carry it too.
            request = encoder_pb2.StreamEmbedImagesRequest(model="resnet18", images=[encoder_pb2.Image(data=b"")])
            assert next(iter(stub.StreamEmbedImages(iter([request])))).results[0].HasField("error")
        with EncoderClient(Endpoint(address, token="t0ken")) as client:
            assert client.model("efficientnet-lite0").dim == 1280
    finally:
        running.stop(0)
        core.close()


def test_servers_age_out_connections_so_clients_rebalance() -> None:
    settings = EncoderSettings(port=0, metrics_port=-1, models=[], random_weights=True,
                               max_connection_age_seconds=0.5, grace_seconds=0.5)
    running, core = create_encoder_server(settings)
    try:
        with channel(f"127.0.0.1:{running.port}") as chan:
            wait_serving(chan, timeout=30)
            stub = encoder_pb2_grpc.EncoderServiceStub(chan)
            states: list[grpc.ChannelConnectivity] = []
            chan.subscribe(states.append, try_to_connect=False)
            end = time.monotonic() + 4
            while time.monotonic() < end:  # calls keep succeeding across the forced reconnects
                assert stub.ListModels(encoder_pb2.ListModelsRequest(), timeout=5).models
                time.sleep(0.1)
            # GOAWAY at the age limit: round robin reconnects (READY again after CONNECTING).
            assert states.count(grpc.ChannelConnectivity.READY) >= 2, states
    finally:
        running.stop(0)
        core.close()
