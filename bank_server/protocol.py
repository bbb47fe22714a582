"""What both ends of the bank's gRPC channel agree on: the service's name, the message
size limit and the channel options that set it, and how large one Step's messages get.
Small on purpose: the client imports it, and a train worker should load no more of the
server than this."""

from __future__ import annotations

import numpy as np

from protos import bank_pb2

SERVICE_NAME = bank_pb2.DESCRIPTOR.services_by_name["MemoryBank"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
# Room for the protobuf framing around the arrays of a message.
ENVELOPE_BYTES = 4096
_INDEX_BYTES = 8
_FEATURE_BYTES = 4  # updates travel as float32 (float16 when given so)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size options, set explicitly and identically on both ends."""
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


def step_message_bytes(updates: int, lookups: int, negatives: int, dim: int, dtype: str) -> int:
    """The largest message (request or answer) of one shard's Step for a step of
    `updates` rows written, `lookups` rows read and `negatives` rows drawn, framing
    included. Sized for every one of them landing on that shard: the most any
    routing or draw can give it, so a run whose first Step fits never outgrows it."""
    row = dim * np.dtype(dtype).itemsize
    request = updates * (_INDEX_BYTES + dim * _FEATURE_BYTES) + lookups * _INDEX_BYTES
    answer = lookups * row + negatives * (_INDEX_BYTES + row)
    return max(request, answer) + ENVELOPE_BYTES


def message_limit(batch: int, negatives: int, dim: int, dtype: str) -> int:
    """The message limit a bank needs for steps of `batch` updates and lookups and
    `negatives` draws: the default, or more when such a Step would not fit in it."""
    return max(DEFAULT_MAX_MESSAGE_BYTES, step_message_bytes(batch, batch, negatives, dim, dtype))
