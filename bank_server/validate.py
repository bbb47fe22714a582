"""Checks of a bank request's values, shared by the shard and the client.

A shard checks its own part of every request; the client checks a whole update
before sending it to several shards, so that one bad row cannot let the other
shards apply their parts. Both call these functions, so a mistake gets the same
error (:class:`InvalidArgument`) and the same message wherever it is caught.
"""

from __future__ import annotations

import numpy as np

from bank_server.errors import InvalidArgument


def integers(values: np.ndarray, field: str) -> np.ndarray:
    """`values` as a 1-d integer array."""
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise InvalidArgument(f"{field} must be a 1-d integer array, got {values.dtype} {list(values.shape)}")
    return values


def indices(values: np.ndarray, total_rows: int, field: str) -> np.ndarray:
    """`values` as a 1-d integer array of global indices in [0, total_rows)."""
    values = integers(values, field)
    bad = (values < 0) | (values >= total_rows)
    if bad.any():
        where = int(np.argmax(bad))
        raise InvalidArgument(f"{field}[{where}] = {int(values[where])} is outside [0, {total_rows})")
    return values


def unique(values: np.ndarray, field: str) -> None:
    """Each row at most once: a momentum update of one row twice in a request has no order."""
    ordered = np.sort(values)
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        raise InvalidArgument(f"{field} has duplicates; each row may be updated once per request")


def matrix(x: np.ndarray, dim: int, field: str, rows: int | None = None) -> np.ndarray:
    """A finite floating-point (n, dim) array; n == rows when given."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise InvalidArgument(f"{field} must have shape (n, {dim}), got {list(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise InvalidArgument(f"{field} has {x.shape[0]} rows but indices has {rows}")
    if x.dtype.kind != "f":
        raise InvalidArgument(f"{field} must be floating point, got {x.dtype}")
    if not np.isfinite(x).all():
        raise InvalidArgument(f"{field} contains NaN or Inf")
    return x


def momentum(value: float, field: str = "update.momentum") -> float:
    if not (np.isfinite(value) and 0.0 <= value < 1.0):
        raise InvalidArgument(f"{field} must be in [0, 1), got {value}")
    return float(value)


def update(
    idx: np.ndarray, features: np.ndarray, momentum_value: float, total_rows: int, dim: int, field: str = "update"
):
    """A whole momentum update: (indices, features) checked together."""
    idx = indices(idx, total_rows, f"{field}.indices")
    unique(idx, f"{field}.indices")
    features = matrix(features, dim, f"{field}.features", rows=len(idx))
    momentum(momentum_value, f"{field}.momentum")
    return idx, features


def count(k: int, low: int, high: int, field: str, what: str) -> int:
    """An integer k in [low, high]; `what` says what `high` is."""
    if not low <= k <= high:
        raise InvalidArgument(f"{field} must be in [{low}, {high}] ({what}), got {k}")
    return int(k)
