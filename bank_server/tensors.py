"""Numpy arrays to and from the wire `Tensor` (raw little-endian bytes + dtype + shape)."""

from __future__ import annotations

import math

import numpy as np

from bank_server.errors import InvalidArgument
from protos import bank_pb2

NUMPY_DTYPES = {
    bank_pb2.FLOAT32: np.dtype("<f4"),
    bank_pb2.FLOAT16: np.dtype("<f2"),
    bank_pb2.INT64: np.dtype("<i8"),
}
WIRE_DTYPES = {dt: code for code, dt in NUMPY_DTYPES.items()}
DTYPE_NAMES = {"float32": bank_pb2.FLOAT32, "float16": bank_pb2.FLOAT16}


def encode(array: np.ndarray) -> bank_pb2.Tensor:
    """The wire form of `array`."""
    array = np.asarray(array)
    wire = WIRE_DTYPES.get(array.dtype.newbyteorder("<"))
    if wire is None:
        raise InvalidArgument(f"dtype {array.dtype} cannot travel; use float32, float16 or int64")
    data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[wire]).tobytes()
    return bank_pb2.Tensor(dtype=wire, shape=array.shape, data=data)


def decode(tensor, field: str, *, dtypes=None, ndim: int | None = None) -> np.ndarray:
    """Read-only view of a wire `Tensor`; raises InvalidArgument naming `field`.

    `dtypes` restricts the accepted wire dtypes; `ndim` the rank.
    """
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}.dtype is unspecified or unknown ({tensor.dtype})")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(bank_pb2.DType.Name(d) for d in dtypes)
        raise InvalidArgument(f"{field}.dtype must be {allowed}, got {bank_pb2.DType.Name(tensor.dtype)}")
    shape = tuple(tensor.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape must have {ndim} dimension(s), got {list(shape)}")
    if any(n < 0 for n in shape):
        raise InvalidArgument(f"{field}.shape has a negative size: {list(shape)}")
    data = tensor.data  # each access of a bytes field copies it out of protobuf
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}: shape {list(shape)} of {bank_pb2.DType.Name(tensor.dtype)} needs "
            f"{expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_optional(tensor: bank_pb2.Tensor, field: str, **kw) -> np.ndarray | None:
    """Like :func:`decode`, but an unset (all-default) tensor is None."""
    if tensor.dtype == bank_pb2.DTYPE_UNSPECIFIED and not tensor.shape and not tensor.data:
        return None
    return decode(tensor, field, **kw)
