"""The hand-written answer codec against protobuf itself: the same bytes out, the same values in."""

import itertools

import numpy as np
import pytest

from bank_server import tensors, wire
from bank_server.errors import InvalidArgument
from protos import bank_pb2

RNG = np.random.default_rng(0)
ARRAYS = {
    "int64 (5,)": RNG.integers(0, 1 << 40, 5),
    "int64 (0,)": np.empty(0, np.int64),
    "float16 (3, 4)": RNG.standard_normal((3, 4)).astype(np.float16),
    "float32 (2, 3)": RNG.standard_normal((2, 3)).astype(np.float32),
    "float32 (0, 8)": np.empty((0, 8), np.float32),
    "float32 (300, 130)": RNG.standard_normal((300, 130)).astype(np.float32),  # multi-byte lengths and dims
    "float16 non-contiguous": RNG.standard_normal((4, 6)).astype(np.float16)[:, ::2],
}


def tensor_equal(parsed, array) -> bool:
    if array is None:
        return parsed is None
    decoded = tensors.decode(parsed, "x")
    return decoded.dtype == array.dtype and decoded.shape == array.shape and np.array_equal(decoded, array)


@pytest.mark.parametrize(
    "applied, rows, indices, sample_rows",
    list(
        itertools.product(
            [False, True],
            [None, ARRAYS["float16 (3, 4)"], ARRAYS["float32 (0, 8)"], ARRAYS["float32 (300, 130)"]],
            [None, ARRAYS["int64 (5,)"]],
            [None, ARRAYS["float16 non-contiguous"]],
        )
    ),
)
def test_step_response_bytes_are_protobufs(applied, rows, indices, sample_rows):
    message = bank_pb2.StepResponse(update_applied=applied)
    for field, array in (("rows", rows), ("sample_indices", indices), ("sample_rows", sample_rows)):
        if array is not None:
            getattr(message, field).CopyFrom(tensors.encode(array))
    data = wire.step_response(applied, rows, indices, sample_rows)
    assert data == message.SerializeToString()
    parsed = wire.parse_step_response(data)
    assert parsed.update_applied == applied and tensor_equal(parsed.rows, rows)
    assert tensor_equal(parsed.sample_indices, indices) and tensor_equal(parsed.sample_rows, sample_rows)


@pytest.mark.parametrize("name", ARRAYS)
def test_lookup_and_sample_responses_are_protobufs(name):
    array = ARRAYS[name]
    lookup = bank_pb2.LookupResponse(rows=tensors.encode(array)).SerializeToString()
    assert wire.lookup_response(array) == lookup and tensor_equal(wire.parse_lookup_response(lookup).rows, array)
    indices = ARRAYS["int64 (5,)"]
    sample = bank_pb2.SampleResponse(indices=tensors.encode(indices), rows=tensors.encode(array)).SerializeToString()
    assert wire.sample_response(indices, array) == sample
    parsed = wire.parse_sample_response(sample)
    assert tensor_equal(parsed.indices, indices) and tensor_equal(parsed.rows, array)
    assert wire.parse_lookup_response(b"").rows is None  # an empty answer: the field is absent


def test_answers_are_views_of_the_received_buffer():
    rows = ARRAYS["float32 (300, 130)"]
    data = wire.lookup_response(rows)
    decoded = tensors.decode(wire.parse_lookup_response(data).rows, "rows")
    assert not decoded.flags.owndata and not decoded.flags.writeable
    assert np.shares_memory(decoded, np.frombuffer(data, np.uint8))


def test_the_parser_reads_any_valid_encoding():
    """What other protobuf writers may send: fields out of order, unknown fields, a shape
    not packed, a message field split over two records (protobuf merges them)."""
    key = wire._key
    shape_unpacked = key(2, 0) + wire._varint(2) + key(2, 0) + wire._varint(3)
    data = np.arange(6, dtype=np.float32)
    body = (
        key(3, 2)
        + wire._varint(data.nbytes)
        + data.tobytes()
        + key(99, 0)
        + wire._varint(5)
        + shape_unpacked
        + key(1, 0)
        + wire._varint(bank_pb2.FLOAT32)
    )
    cut = body.index(key(99, 0))  # between two records of the Tensor
    split = (
        key(2, 2)
        + wire._varint(cut)
        + body[:cut]
        + key(7, 5)
        + b"\0\0\0\0"
        + key(2, 2)
        + wire._varint(len(body) - cut)
        + body[cut:]
    )
    parsed = wire.parse_lookup_response(key(1, 2) + wire._varint(0) + split)  # rows empty, then "unknown" field 2
    assert parsed.rows == wire.WireTensor()
    step = wire.parse_step_response(split + key(1, 0) + b"\x01")
    np.testing.assert_array_equal(tensors.decode(step.rows, "rows"), data.reshape(2, 3))
    assert step.update_applied and step.sample_indices is None
    # And protobuf itself agrees on that encoding.
    reference = bank_pb2.StepResponse.FromString(split + key(1, 0) + b"\x01")
    assert list(reference.rows.shape) == [2, 3] and reference.update_applied


@pytest.mark.parametrize("data", [b"\x12\x05\x01", b"\x80", b"\x0d\x01", b"\x0b", b"\x00\x01"])
def test_malformed_messages_are_refused(data):
    with pytest.raises(InvalidArgument, match="malformed"):
        wire.parse_step_response(data)
