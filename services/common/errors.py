"""Domain exceptions of the service cores and the gRPC status code each one maps to."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of the errors a core raises on purpose; the interceptor turns them into statuses.

    Attributes:
        code: the gRPC status code the error maps to.
        message: what was wrong and where, e.g. "image 17 of 64: cannot decode (truncated JPEG)".
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """The request itself is wrong (undecodable image, wrong dimension, NaN vector, bad spec)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """An unknown model, collection or run."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    """Creating something that exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The system is not in a state for this request (e.g. dimension mismatch); not retryable."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """Too large (batch, image, pixels), queue full, or device out of memory."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A backend is down or not ready yet; retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    """The work was cancelled (client went away, run cancelled)."""

    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServiceError):
    """Missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(ServiceError):
    """A fault of ours (e.g. a model produced a non-finite embedding)."""

    code = grpc.StatusCode.INTERNAL


def rpc_code_value(code: grpc.StatusCode) -> int:
    """The numeric google.rpc.Code of a grpc.StatusCode (for per-item google.rpc.Status)."""
    value: int = code.value[0]
    return value
