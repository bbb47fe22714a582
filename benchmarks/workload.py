"""What a training step asks of the bank, for the benchmarks to replay: batches of
distinct row indices with unit features, and the bytes one `Step` puts on the wire."""

from __future__ import annotations

import numpy as np

from bank_server import tensors
from protos import bank_pb2

MOMENTUM = 0.5  # the bank's update v <- normalize(m v + (1 - m) f), as the paper's m

# A fresh client's sequence numbers: varints of one byte (a long run's take three).
_SEQUENCE = 1
_CLIENT_ID = "0" * 32  # as long as BankClient's uuid4().hex


class StepWorkload:
    """A cycle of `count` batches, each `batch` distinct indices in [0, rows) and
    `batch` unit float32 features of `dim`, drawn up front from `seed` so that timed
    loops only call the bank. Batch i is ``indices(i)``, ``features(i)``; any i goes."""

    def __init__(self, rows: int, dim: int, batch: int, seed: int, count: int = 64):
        if not 1 <= batch <= rows:
            raise ValueError(f"the batch ({batch}) must be between 1 and the rows ({rows})")
        rng = np.random.default_rng(seed)
        self._indices = [rng.choice(rows, batch, replace=False) for _ in range(count)]
        f = rng.standard_normal((count, batch, dim), dtype=np.float32)
        self._features = f / np.linalg.norm(f, axis=2, keepdims=True)

    def __len__(self) -> int:
        return len(self._indices)

    def indices(self, i: int) -> np.ndarray:
        return self._indices[i % len(self._indices)]

    def features(self, i: int) -> np.ndarray:
        return self._features[i % len(self._features)]


def step_message_bytes(batch: int, negatives: int, dim: int, dtype: str, shards: int) -> list[tuple[int, int]]:
    """(request, answer) bytes of each shard's `Step`, as protobuf encodes them: float32
    features in, rows in the bank's `dtype` out, a nonzero momentum, the batch and the
    negatives split over the shards as evenly as `g % shards` splits 0..n-1."""
    sizes = []
    for s in range(shards):
        b, k = len(range(s, batch, shards)), len(range(s, negatives, shards))
        request = bank_pb2.StepRequest(
            update=bank_pb2.UpdateRequest(indices=tensors.encode(np.zeros(b, np.int64)),
                                          features=tensors.encode(np.zeros((b, dim), np.float32)),
                                          momentum=MOMENTUM, client_id=_CLIENT_ID, sequence=_SEQUENCE),
            lookup_indices=tensors.encode(np.zeros(b, np.int64)), sample_k=k)
        answer = bank_pb2.StepResponse(
            update_applied=True, rows=tensors.encode(np.zeros((b, dim), dtype)),
            sample_indices=tensors.encode(np.zeros(k, np.int64)),
            sample_rows=tensors.encode(np.zeros((k, dim), dtype)))
        sizes.append((request.ByteSize(), answer.ByteSize()))
    return sizes
