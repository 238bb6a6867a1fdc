"""Hand-made bad requests to the encoder (at most 8 images or texts a request, 1 MiB a message, texts of
at most 200 characters for clip-micro), each with the code and message it must get."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

from tests.encoder.images import jpeg
from tests.hostile.corpus import Bad, check
from tests.hostile.harness import Case, in_flight, invoke
from tests.hostile.rpcs import BY_NAME
from tests.hostile.servers import CLIP_MICRO, MICRO, NOT_LOADED, Platform
from tests.hostile.wire import length_delimited

C = grpc.StatusCode
E = encoder_pb2
IMAGE = E.Image(data=jpeg(48, 40), id="cat.jpg")
LONG_ID = "x" * 100_000
BAD_UTF8_MODEL = length_delimited(1, b"dinov2-\xff\xfe") + length_delimited(2, IMAGE.SerializeToString())
BAD_UTF8_TEXT = length_delimited(1, CLIP_MICRO.id.encode()) + length_delimited(2, b"a photo of a \xc0\x80")

CORPUS = {
    "model id of 100 KB": Bad("encoder.EmbedImages", (E.EmbedImagesRequest(model=LONG_ID, images=[IMAGE]),),
                              C.NOT_FOUND, "(100000 characters)': ids have at most 200 characters"),
    "GetModel of a 100 KB id": Bad("encoder.GetModel", (E.GetModelRequest(model=LONG_ID),), C.NOT_FOUND,
                                   "ids have at most 200 characters"),
    "openclip id of 100 KB": Bad("encoder.GetModel", (E.GetModelRequest(model="openclip:ViT-B-32/" + LONG_ID),),
                                 C.NOT_FOUND, "ids have at most 200 characters"),
    "non-UTF-8 model id": Bad("encoder.EmbedImages", (BAD_UTF8_MODEL,), C.INVALID_ARGUMENT,
                              "the request is not a valid retrieval.v1.EmbedImagesRequest"),
    "unknown model": Bad("encoder.EmbedImages", (E.EmbedImagesRequest(model="nope", images=[IMAGE]),), C.NOT_FOUND,
                         "unknown model 'nope'"),
    "known model, not loaded": Bad("encoder.EmbedImages", (E.EmbedImagesRequest(model=NOT_LOADED, images=[IMAGE]),),
                                   C.FAILED_PRECONDITION, f"model {NOT_LOADED} is known but not loaded"),
    "no images": Bad("encoder.EmbedImages", (E.EmbedImagesRequest(model=MICRO.id),), C.INVALID_ARGUMENT,
                     "the request has no images"),
    "too many images": Bad("encoder.EmbedImages", (E.EmbedImagesRequest(images=[IMAGE] * 9),), C.RESOURCE_EXHAUSTED,
                           "9 images in one request, over the limit of 8"),
    "message over --max-message-bytes": Bad(
        "encoder.EmbedImages", (E.EmbedImagesRequest(images=[E.Image(data=b"\0" * (1 << 20))]),),
        C.RESOURCE_EXHAUSTED, "larger than max"),
    "texts to an image-only model": Bad("encoder.EmbedTexts", (E.EmbedTextsRequest(model=MICRO.id, texts=["a"]),),
                                        C.INVALID_ARGUMENT, "model dinov2-micro embeds images only"),
    "non-UTF-8 text": Bad("encoder.EmbedTexts", (BAD_UTF8_TEXT,), C.INVALID_ARGUMENT,
                          "the request is not a valid retrieval.v1.EmbedTextsRequest"),
    "too many texts": Bad("encoder.EmbedTexts", (E.EmbedTextsRequest(model=CLIP_MICRO.id, texts=["a"] * 9),),
                          C.RESOURCE_EXHAUSTED, "9 texts in one request, over the limit of 8"),
    "no texts": Bad("encoder.EmbedTexts", (E.EmbedTextsRequest(model=CLIP_MICRO.id),), C.INVALID_ARGUMENT,
                    "the request has no texts"),
    "a bad message in the middle of a stream": Bad(
        "encoder.StreamEmbedImages", (E.StreamEmbedImagesRequest(images=[IMAGE]), b"\x12\x05\x0a",
                                      E.StreamEmbedImagesRequest(images=[IMAGE])),
        C.INVALID_ARGUMENT, "stream message 1 is not a valid retrieval.v1.StreamEmbedImagesRequest"),
    "an unknown model in the middle of a stream": Bad(
        "encoder.StreamEmbedImages", (E.StreamEmbedImagesRequest(images=[IMAGE]),
                                      E.StreamEmbedImagesRequest(model="nope", images=[IMAGE])),
        C.NOT_FOUND, "unknown model 'nope'"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_encoder_request(name: str, platform: Platform) -> None:
    outcome = check(CORPUS[name], platform)
    if BY_NAME[CORPUS[name].rpc].kind == "bidi":
        assert len(outcome.responses) == 1  # the messages before the bad one were answered


def test_over_long_text_fails_alone(platform: Platform) -> None:
    stub = encoder_pb2_grpc.EncoderServiceStub(platform.channels["encoder"])
    answer = stub.EmbedTexts(E.EmbedTextsRequest(model=CLIP_MICRO.id, texts=["a cat", "x" * 201, "a dog"]), timeout=30)
    assert [r.HasField("vector") for r in answer.results] == [True, False, True]
    error = answer.results[1].error
    assert error.code == C.INVALID_ARGUMENT.value[0]
    assert error.message == "text 1 of 3: 201 characters, over the limit of 200 for clip-micro"


@pytest.mark.parametrize("cancel_after", [0, 1, 2])
def test_a_cancelled_stream_leaves_nothing_running(platform: Platform, cancel_after: int) -> None:
    """A client that cancels StreamEmbedImages (before any answer, or midway) while it keeps its side
    open: the server's handler ends, its stream thread is free again, and the metrics say CANCELLED."""
    messages = tuple(E.StreamEmbedImagesRequest(images=[IMAGE]).SerializeToString() for _ in range(3))
    case = Case("cancel", messages, cancel_after=cancel_after)
    outcome = invoke(platform, BY_NAME["encoder.StreamEmbedImages"], case)
    assert outcome.cut and len(outcome.responses) == cancel_after
    deadline = time.monotonic() + 5
    while in_flight(platform)["encoder"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(platform)["encoder"] == 0, "the cancelled stream's handler is still running"


def test_an_idle_stream_cancelled_by_its_client_ends(platform: Platform) -> None:
    """A stream that never sent a message, then cancelled: the handler ends too."""
    gate = threading.Event()

    def nothing() -> Iterator[E.StreamEmbedImagesRequest]:
        gate.wait(10)
        yield from ()

    call = encoder_pb2_grpc.EncoderServiceStub(platform.channels["encoder"]).StreamEmbedImages(nothing(), timeout=30)
    time.sleep(0.3)
    call.cancel()
    gate.set()
    deadline = time.monotonic() + 5
    while in_flight(platform)["encoder"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(platform)["encoder"] == 0
