"""Protobuf's wire format for the bank's bulk answers, written and read by hand.

Step, Lookup and Sample answer with arrays of about a MB. Protobuf's Python messages
copy an array's bytes into the message, again to serialize it, and twice more on the
way out of a parsed one. Here an answer is its tags, lengths and the arrays' own
buffers joined once, and a parsed answer holds `memoryview`s of the received buffer,
which numpy reads without a copy. (Requests, a tenth of the size, stay protobuf's,
whose C parser reads them faster than Python could.)

The contract does not change: what is written is byte for byte what
``SerializeToString`` gives for the same message (tests/bank_server/test_wire.py
compares every shape, empty and absent fields included), and the parser reads any
valid encoding of these messages (fields in any order, unknown fields, a shape packed
or not, a message field split over several records), so any client or server built
from bank.proto alone keeps working with ours.

A parsed `Tensor` is a `WireTensor`, read by `bank_server.tensors.decode` exactly as
a protobuf one; an absent message field is None.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from bank_server import tensors
from bank_server.errors import InvalidArgument

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_SIZES = {_FIXED64: 8, _FIXED32: 4}


class WireTensor(NamedTuple):
    dtype: int = 0
    shape: tuple = ()
    data: bytes | memoryview = b""


class StepResponse(NamedTuple):
    update_applied: bool
    rows: WireTensor | None
    sample_indices: WireTensor | None
    sample_rows: WireTensor | None


class LookupResponse(NamedTuple):
    rows: WireTensor | None


class SampleResponse(NamedTuple):
    indices: WireTensor | None
    rows: WireTensor | None


# -- writing ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64: two's complement in ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _record(field: int, parts: list) -> list:
    """A length-delimited field around `parts` (bytes-like pieces)."""
    return [_key(field, _LENGTH), _varint(sum(len(p) for p in parts)), *parts]


def _field(field: int, array) -> list:
    """The pieces of `field`, a `Tensor` message holding `array`: its framing, then the
    array's own buffer (not a copy, when it is already C-contiguous little-endian of a
    wire dtype)."""
    array = np.asarray(array)
    wire = tensors.WIRE_DTYPES.get(array.dtype.newbyteorder("<"))
    if wire is None:
        raise InvalidArgument(f"dtype {array.dtype} cannot travel; use float32, float16 or int64")
    array = np.ascontiguousarray(array, dtype=tensors.NUMPY_DTYPES[wire])
    framing = _framing(field, wire, array.shape)
    return [framing, memoryview(array).cast("B")] if array.nbytes else [framing]


@functools.lru_cache(maxsize=4096)
def _framing(field: int, wire: int, shape: tuple) -> bytes:
    """A tensor field's bytes up to its array's data (all of them when it has none):
    the same for every array of that dtype and shape, and a shard sees a few hundred
    shapes (its share of a batch and of the negatives), so they are made once each."""
    itemsize = tensors.NUMPY_DTYPES[wire].itemsize
    nbytes = math.prod(shape) * itemsize
    body = [_key(1, _VARINT), _varint(wire)]
    if shape:
        body += _record(2, [b"".join(_varint(n) for n in shape)])
    if nbytes:
        body += [_key(3, _LENGTH), _varint(nbytes)]
    head = b"".join(body)
    return _key(field, _LENGTH) + _varint(len(head) + nbytes) + head


_APPLIED = _key(1, _VARINT) + b"\x01"  # update_applied = true


def _join(parts: list) -> bytes:
    return b"".join(parts)


def step_response(update_applied: bool, rows=None, sample_indices=None, sample_rows=None) -> bytes:
    parts = [_APPLIED] if update_applied else []
    for field, array in ((2, rows), (3, sample_indices), (4, sample_rows)):
        if array is not None:
            parts += _field(field, array)
    return _join(parts)


def lookup_response(rows) -> bytes:
    return _join(_field(1, rows))


def sample_response(indices, rows) -> bytes:
    return _join(_field(1, indices) + _field(2, rows))


# -- reading ---------------------------------------------------------------------------


def _read_varint(buf: memoryview, at: int) -> tuple[int, int]:
    if at < len(buf) and buf[at] < 0x80:  # most keys and small numbers: one byte
        return buf[at], at + 1
    value = shift = 0
    while True:
        if at >= len(buf):
            raise InvalidArgument("malformed message: truncated varint")
        byte = buf[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise InvalidArgument("malformed message: varint longer than 10 bytes")


def _fields(buf) -> dict[int, list]:
    """Every record of a message: field number -> [(wire type, value), ...] in order;
    a value is an int (varint), bytes (fixed) or a memoryview (length-delimited)."""
    buf = buf if isinstance(buf, memoryview) else memoryview(buf)
    end = len(buf)
    out: dict[int, list] = {}
    at = 0
    while at < end:
        key, at = _read_varint(buf, at)
        field, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH:
            size, at = _read_varint(buf, at)
            value, at = buf[at : at + size], at + size
        elif wire_type == _VARINT:
            value, at = _read_varint(buf, at)
        elif wire_type in _SIZES:
            value, at = bytes(buf[at : at + _SIZES[wire_type]]), at + _SIZES[wire_type]
        else:
            raise InvalidArgument(f"malformed message: wire type {wire_type}")
        if field == 0 or at > end:
            raise InvalidArgument("malformed message: a bad field number or a field past the end")
        out.setdefault(field, []).append((wire_type, value))
    return out


def _last_int(fields: dict, field: int, default: int | None = 0) -> int | None:
    """A scalar: the last record wins (protobuf's merge rule)."""
    values = [v for t, v in fields.get(field, ()) if t == _VARINT]
    return values[-1] if values else default


def _message(fields: dict, field: int) -> memoryview | None:
    """A message field's bytes; records of the same field merge, as if concatenated."""
    records = [v for t, v in fields.get(field, ()) if t == _LENGTH]
    if not records:
        return None
    return records[0] if len(records) == 1 else memoryview(b"".join(records))


def _wire_tensor(buf: memoryview | None) -> WireTensor | None:
    if buf is None:
        return None
    fields = _fields(buf)
    shape = []
    for wire_type, value in fields.get(2, ()):
        if wire_type == _LENGTH:  # packed
            at = 0
            while at < len(value):
                n, at = _read_varint(value, at)
                shape.append(_signed(n))
        else:
            shape.append(_signed(value))
    data = [v for t, v in fields.get(3, ()) if t == _LENGTH]
    return WireTensor(_last_int(fields, 1), tuple(shape), data[-1] if data else b"")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_step_response(data: bytes) -> StepResponse:
    fields = _fields(data)
    return StepResponse(bool(_last_int(fields, 1)), *(_wire_tensor(_message(fields, f)) for f in (2, 3, 4)))


def parse_lookup_response(data: bytes) -> LookupResponse:
    return LookupResponse(_wire_tensor(_message(_fields(data), 1)))


def parse_sample_response(data: bytes) -> SampleResponse:
    fields = _fields(data)
    return SampleResponse(_wire_tensor(_message(fields, 1)), _wire_tensor(_message(fields, 2)))
