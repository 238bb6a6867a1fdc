"""Callers without the right token: refused with UNAUTHENTICATED before their request is decoded, while
health and reflection stay open (probes carry no token) and a server without a token ignores one; and
the health service's own answers to bad requests."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from retrieval.v1 import encoder_pb2, evaluator_pb2, search_pb2

from tests.hostile.corpus import Bad, check
from tests.hostile.servers import MICRO, REF, Platform

C = grpc.StatusCode
MISSING = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

CORPUS = {
    "two authorization headers": Bad("search.GetCollection", (search_pb2.GetCollectionRequest(name=REF),),
                                     C.UNAUTHENTICATED, "more than one 'authorization' header", auth="double"),
    "no token where one is required": Bad("evaluator.ListRuns", (evaluator_pb2.ListRunsRequest(),), C.UNAUTHENTICATED,
                                          MISSING, auth="none"),
    "a wrong token": Bad("search.Count", (search_pb2.CountRequest(collection=REF),), C.UNAUTHENTICATED, MISSING,
                         auth="wrong"),
    "no token and an undecodable request": Bad("search.Count", (b"\x0a\xff",), C.UNAUTHENTICATED, MISSING,
                                               auth="none"),
    "no token on a stream": Bad("search.Upsert", (search_pb2.UpsertRequest(collection=REF),), C.UNAUTHENTICATED,
                                MISSING, auth="none"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_caller_without_the_right_token_is_refused(name: str, platform: Platform) -> None:
    check(CORPUS[name], platform)


@pytest.mark.parametrize(("rpc", "request_message"), [
    ("search.Check", health_pb2.HealthCheckRequest()),
    ("search.ServerReflectionInfo", reflection_pb2.ServerReflectionRequest(list_services="")),
    ("encoder.GetModel", encoder_pb2.GetModelRequest(model=MICRO.id)),
])
def test_open_services_answer_callers_without_a_token(rpc: str, request_message: object, platform: Platform) -> None:
    outcome = Bad(rpc, (request_message,), C.OK, "", auth="none").send(platform)  # type: ignore[arg-type]
    assert outcome.code == C.OK and outcome.responses, outcome.details


def test_undecodable_health_watch_is_invalid_argument(platform: Platform) -> None:
    """Health Watch runs in grpcio's non-blocking mode; an undecodable request must still be INVALID_ARGUMENT
    (it was INTERNAL: "Exception deserializing request!")."""
    check(Bad("evaluator.Watch", (b"\x0a\x05ab",), C.INVALID_ARGUMENT,
              "the request is not a valid grpc.health.v1.HealthCheckRequest"), platform)


def test_unknown_health_service_is_not_found(platform: Platform) -> None:
    outcome = Bad("search.Check", (health_pb2.HealthCheckRequest(service="nope"),), C.NOT_FOUND, "").send(platform)
    assert outcome.code == C.NOT_FOUND
