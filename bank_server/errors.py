"""Domain errors of the memory bank, and the one place they become gRPC codes.

The shard and the codec raise these; they carry no gRPC. The servicer maps them
with :func:`status_code`, so every RPC reports the same kind of mistake the same
way.
"""

from __future__ import annotations

import grpc


class BankError(Exception):
    """Base of every error the bank raises on purpose."""


class InvalidArgument(BankError, ValueError):
    """The request itself is wrong: bad index, shape, dtype, value or k."""


class FailedPrecondition(BankError):
    """The request is well formed but the bank's state forbids it (layout mismatch)."""


class NotFound(BankError):
    """A named thing (a snapshot tag) does not exist."""


class ResourceExhausted(BankError):
    """The request or its answer would exceed a size limit."""


class Unavailable(BankError):
    """The shard is not ready yet (still restoring its snapshot)."""


class DataLoss(BankError):
    """Stored state (a snapshot, LATEST, the update log) cannot be read as it was
    written; the message names the file and what is wrong."""


_CODES = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_code(error: BankError) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
