"""Domain exceptions of the service cores and the gRPC status code each one maps to."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ServiceError(Exception):
    """Base of the errors a core raises on purpose; the interceptor turns them into statuses.

    Attributes:
        code: the gRPC status code the error maps to.
        message: what was wrong and where, e.g. "image 17 of 64: cannot decode (truncated JPEG)".
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds after which a retry may succeed (load shedding); sent as google.rpc.RetryInfo.
        self.retry_after = retry_after


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


class DataLoss(ServiceError):
    """Stored data is corrupt (e.g. a weights file whose checksum does not match); not retryable."""

    code = grpc.StatusCode.DATA_LOSS


class Internal(ServiceError):
    """A fault of ours (e.g. a model produced a non-finite embedding)."""

    code = grpc.StatusCode.INTERNAL


def rpc_code_value(code: grpc.StatusCode) -> int:
    """The numeric google.rpc.Code of a grpc.StatusCode (for per-item google.rpc.Status)."""
    value: int = code.value[0]
    return value


# Longest status message sent, in UTF-8 bytes. gRPC carries it in a header (percent-encoded, up to 3x)
# and again in grpc-status-details-bin (base64); clients drop headers past 8-16 KiB, and with them the
# whole answer ("received metadata size exceeds hard limit"), so an echoed 100 KB name would hide it.
MAX_STATUS_MESSAGE_BYTES = 1024


def bounded_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` if its UTF-8 form fits in ``limit`` bytes, else its beginning and its end (which say
    what was wrong and why) around a note of how much was left out."""
    data = message.encode()
    if len(data) <= limit:
        return message
    half = (limit - 48) // 2
    head, tail = data[:half].decode(errors="ignore"), data[-half:].decode(errors="ignore")
    return f"{head}...[{len(message) - len(head) - len(tail)} characters left out]...{tail}"


def rich_status(code: grpc.StatusCode, message: str, retry_after: float | None = None) -> grpc.Status:
    """A status for ``context.abort_with_status``, with a ``google.rpc.RetryInfo`` detail when
    ``retry_after`` (seconds) is given: the hint that tells a client this refusal is load shedding
    and when to try again. The message is bounded (``bounded_message``)."""
    message = bounded_message(message)
    details = []
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        info = any_pb2.Any()
        info.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(info)
    return rpc_status.to_status(status_pb2.Status(code=rpc_code_value(code), message=message, details=details))


def retry_after_of(error: grpc.RpcError) -> float | None:
    """The ``RetryInfo`` delay (seconds) a server attached to ``error``, or None when there is none."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                              Unavailable, DeadlineExceeded, Cancelled, Unauthenticated, DataLoss, Internal)
}


def from_rpc_error(error: grpc.RpcError, where: str) -> ServiceError:
    """The domain error for a failed call to another service, its message a sentence that says where.

    For example ``search service at 10.0.0.7:50052: NOT_FOUND: no collection named 'x'``. Codes
    without a domain class (UNKNOWN, UNIMPLEMENTED, ...) become ``Internal``; the retry hint travels.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = _BY_CODE.get(code, Internal)
    return cls(f"{where}: {code.name}: {details}", retry_after=retry_after_of(error))
