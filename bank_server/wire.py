"""Protobuf's wire format for the bank's bulk answers, written and read by hand.

Step, Lookup and Sample answer with arrays of about a MB. Protobuf's Python messages
copy an array's bytes into the message, again to serialize it, and twice more on the
way out of a parsed one. Here the server lays an answer out first (`step_answer`,
`lookup_answer`, `sample_answer`: its tags and lengths, with a `Slot` of room for each
array, the framing cached per shape) and the shard gathers its rows straight into the
answer's bytes; `step_response` and friends join arrays that already exist, one copy.
A parsed answer holds `memoryview`s of the received buffer, which numpy reads without
a copy. (Requests, a tenth of the size, stay protobuf's: `instdisc bench parts`
measured its C parser faster than a Python one on them.)

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

import ctypes
import functools
import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bank_server import tensors
from bank_server.errors import InvalidArgument

if sys.byteorder != "little":  # the shard writes its arrays' own bytes into the answers
    raise ImportError("bank_server.wire fills answers with native bytes, which the wire format wants "
                      "little-endian: this host is big-endian")

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

class Slot(NamedTuple):
    """Room in an answer for an array not made yet: the shard writes it in place."""
    dtype: np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, eq=False)  # never hashed by value: the bytes are not filled yet
class Answer:
    """An answer's bytes with its `Slot`s' arrays as writable views into them, in order
    (None for an absent field). Fill the arrays, then hand on `data`, and nothing else:
    from then on the bytes are immutable again."""
    data: bytes
    arrays: tuple


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


def _size(part) -> int:
    return part.nbytes if isinstance(part, Slot) else len(part)


def _record(field: int, parts: list) -> list:
    """A length-delimited field around `parts` (bytes-like pieces and Slots)."""
    return [_key(field, _LENGTH), _varint(sum(map(_size, parts))), *parts]


def _tensor(content) -> list:
    """The pieces of a `Tensor` message holding `content`: an array (its buffer, not a
    copy, when it is already C-contiguous little-endian of a wire dtype) or a Slot."""
    if isinstance(content, Slot):
        dtype, shape, body = np.dtype(content.dtype), content.shape, content
    else:
        array = np.asarray(content)
        dtype, shape = array.dtype, array.shape
    wire = tensors.WIRE_DTYPES.get(dtype.newbyteorder("<"))
    if wire is None:
        raise InvalidArgument(f"dtype {dtype} cannot travel; use float32, float16 or int64")
    if not isinstance(content, Slot):
        array = np.ascontiguousarray(array, dtype=tensors.NUMPY_DTYPES[wire])
        body = memoryview(array).cast("B") if array.nbytes else b""
    parts = [_key(1, _VARINT), _varint(wire)]
    if shape:
        parts += _record(2, [b"".join(_varint(n) for n in shape)])
    if _size(body):
        parts += _record(3, [body])
    return parts


def _fields_parts(head: list, fields) -> list:
    parts = list(head)
    for field, content in fields:
        if content is not None:
            parts += _record(field, _tensor(content))
    return parts


# A bytes object made by the C API's PyBytes_FromStringAndSize(NULL, n) is uninitialised
# and its maker's to fill before anyone else sees it: that is how C extensions build
# bytes. gRPC sends only `bytes`, and an answer is about a MB: filling it in place spares
# the copy that joining its pieces would make.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype, _new_bytes.argtypes = ctypes.py_object, (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype, _bytes_address.argtypes = ctypes.c_void_p, (ctypes.py_object,)


def _laid_out(fields: tuple, head: bytes = b"") -> Answer:
    """The answer of `fields` ((field number, Slot or None), ...), `head` first, its
    arrays to be filled in place."""
    chunks, places, at, pending = [], [], 0, head
    for field, slot in fields:
        if slot is None:
            places.append(None)
            continue
        framing = _framing(field, slot)
        pending += framing
        if slot.nbytes:  # the record ends with the array's data
            chunks.append((at, pending))
            at += len(pending)
            places.append(at)
            at += slot.nbytes
            pending = b""
        else:
            places.append(None)
    if pending:
        chunks.append((at, pending))
        at += len(pending)
    if at < 2:  # 0 and 1 byte objects may be CPython's shared ones: never written into
        return Answer(_join(_fields_parts([head], fields)), tuple(_empty(c) for _, c in fields))
    data = _new_bytes(None, at)
    address = _bytes_address(data)
    for offset, chunk in chunks:
        ctypes.memmove(address + offset, chunk, len(chunk))
    return Answer(data, tuple(_empty(slot) if offset is None else np.asarray(_Memory(data, address + offset, slot))
                              for (_, slot), offset in zip(fields, places)))


@functools.lru_cache(maxsize=4096)
def _framing(field: int, slot: Slot) -> bytes:
    """A Slot's record up to its array's data: the field's key and length, the Tensor's
    dtype and shape, the data's key and length (all of it when the array has no bytes).
    Cached per field, dtype and shape: a shard of an S-shard bank sees a few hundred."""
    parts = _record(field, _tensor(slot))
    return b"".join(bytes(p) for p in (parts[:-1] if parts[-1] is slot else parts))


class _Memory:
    """A Slot's array at `address` inside `data`, for numpy to view; the view's base
    holds `data`, so the bytes live as long as any view of them."""

    def __init__(self, data: bytes, address: int, slot: Slot):
        self.data = data
        self.__array_interface__ = {"data": (address, False), "shape": slot.shape,
                                    "typestr": np.dtype(slot.dtype).str, "version": 3}


def _empty(content):
    """What a Slot that took no bytes holds (an array of no elements); None stays None."""
    return np.empty(content.shape, content.dtype) if isinstance(content, Slot) else content


def _join(parts: list) -> bytes:
    return b"".join(parts)


def _applied(update_applied: bool) -> bytes:
    return _key(1, _VARINT) + b"\x01" if update_applied else b""


def step_response(update_applied: bool, rows=None, sample_indices=None, sample_rows=None) -> bytes:
    return _join(_fields_parts([_applied(update_applied)], ((2, rows), (3, sample_indices), (4, sample_rows))))


def step_answer(update_applied: bool, rows: Slot | None, sample_indices: Slot | None,
                sample_rows: Slot | None) -> Answer:
    """The Step answer with room for its arrays, to be filled in place."""
    return _laid_out(((2, rows), (3, sample_indices), (4, sample_rows)), _applied(update_applied))


def lookup_response(rows) -> bytes:
    return _join(_fields_parts([], ((1, rows),)))


def lookup_answer(rows: Slot) -> Answer:
    return _laid_out(((1, rows),))


def sample_response(indices, rows) -> bytes:
    return _join(_fields_parts([], ((1, indices), (2, rows))))


def sample_answer(indices: Slot, rows: Slot) -> Answer:
    return _laid_out(((1, indices), (2, rows)))


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
            value, at = buf[at:at + size], at + size
        elif wire_type == _VARINT:
            value, at = _read_varint(buf, at)
        elif wire_type in _SIZES:
            value, at = bytes(buf[at:at + _SIZES[wire_type]]), at + _SIZES[wire_type]
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
