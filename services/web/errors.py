"""Errors as a person reads them: an HTTP status from the gRPC code, and a sentence without internals.

The services' errors reach the gateway as ``services.common.errors.ServiceError``s whose message
names the service, its address and the code ("encoder service at 10.0.0.7:50051: UNAVAILABLE:
failed to connect to all addresses; ..."). A person needs to know what failed and what still
works, not the transport's details.
"""

from __future__ import annotations

import re

import grpc

from services.common import errors as ce

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,  # too large; 429 when the service asked for a retry (load)
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 502,
    grpc.StatusCode.DATA_LOSS: 500,
}

_BY_CODE: dict[grpc.StatusCode, type[ce.ServiceError]] = {
    cls.code: cls for cls in (ce.InvalidArgument, ce.NotFound, ce.AlreadyExists, ce.FailedPrecondition,
                              ce.ResourceExhausted, ce.Unavailable, ce.DeadlineExceeded, ce.Cancelled,
                              ce.Unauthenticated, ce.Internal)}

_UPSTREAM = re.compile(r"^(?P<service>\w+ service) at (?P<address>\S+): (?P<code>[A-Z_]+): (?P<details>.*)$",
                       re.DOTALL)

WHAT_STILL_WORKS = {
    "encoder service": "searching by image or text is off until it is back; 'Search with this' on results "
                       "and the reports still work",
    "search service": "no search can run until it is back; the reports still work",
    "evaluator service": "the run list and new runs wait until it is back; searching still works",
}


def error_for(code: grpc.StatusCode, message: str) -> ce.ServiceError:
    """The domain error of a gRPC code (e.g. for a per-item error of a batch)."""
    return _BY_CODE.get(code, ce.Internal)(message)


def http_status(error: ce.ServiceError) -> int:
    """The HTTP status of a domain error: the most specific code wins, load shedding is 429."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
        return 429
    return HTTP_STATUS.get(error.code, 500)


def _capitalised(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def sentence(error: ce.ServiceError) -> str:
    """What the person is told: which service, what went wrong, what still works."""
    match = _UPSTREAM.match(error.message)
    if match is None:  # the gateway's own sentence
        text = error.message.strip()
        return text if text.endswith((".", "?", "!")) else text + "."
    service, address, details = match["service"], match["address"], match["details"].strip()
    if error.code == grpc.StatusCode.UNAVAILABLE:
        consequence = WHAT_STILL_WORKS.get(service, "try again in a moment")
        return f"The {service} ({address}) is not reachable: {consequence}."
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"The {service} refused the access token: enter the right one under 'Access token' "
                "(the services' --auth-token).")
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"The {service} did not answer in time; try again."
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
        return f"The {service} is busy; try again in {max(1, round(error.retry_after))} s."
    return f"The {service} refused: {_capitalised(details)}"
