"""The gRPC face of a shard: decode, validate the wire format, call the shard, encode.

Semantic validation (ranges, shards, finiteness) lives in :class:`Shard`; this
module checks only what the wire can get wrong (dtype, shape vs byte length) and
the message-size limit of the answer, then maps domain errors to status codes.

The bulk answers (Step, Lookup, Sample) are written in protobuf's wire format by
`bank_server.wire`, without protobuf's copies of the arrays; `add_to_server` says which
method uses which codec.
"""

from __future__ import annotations

import functools
import logging

import grpc
import numpy as np

from bank_server import tensors, wire
from bank_server.errors import BankError, DataLoss, InvalidArgument, ResourceExhausted, Unavailable, status_code
from bank_server.protocol import ENVELOPE_BYTES, SERVICE_NAME
from bank_server.shard import Shard
from protos import bank_pb2, bank_pb2_grpc

log = logging.getLogger(__name__)

FLOATS = (bank_pb2.FLOAT32, bank_pb2.FLOAT16)
INDICES = (bank_pb2.INT64,)


def _rpc(method):
    """Run an RPC body, turning domain errors into a status with their message."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except BankError as error:
            context.abort(status_code(error), str(error))

    return wrapper


class MemoryBankServicer(bank_pb2_grpc.MemoryBankServicer):
    def __init__(self, max_message_bytes: int, snapshot_dir: str | None = None, keep_snapshots: int = 0):
        self.max_message_bytes = max_message_bytes
        self.snapshot_dir = snapshot_dir
        self.keep_snapshots = keep_snapshots
        self.shard: Shard | None = None  # None until created or restored
        self.set_serving = lambda serving: None  # the server's health, told while a Restore runs
        self._restoring = False

    def _ready(self) -> Shard:
        if self.shard is None:
            raise Unavailable("shard is loading its snapshot; retry shortly")
        if self._restoring:
            raise Unavailable("shard is restoring a snapshot; retry shortly")
        if self.shard.damaged:
            raise DataLoss(f"{self.shard.damaged}; restart the shard: it recovers from LATEST and its update log")
        return self.shard

    def _check_answer_size(self, nbytes: int, field: str) -> None:
        if nbytes + ENVELOPE_BYTES > self.max_message_bytes:
            raise ResourceExhausted(
                f"{field}: the answer would be {nbytes} bytes, over the max message size "
                f"{self.max_message_bytes}; ask for fewer (BankClient splits large requests)"
            )

    def _row_bytes(self, shard: Shard) -> int:
        return shard.layout.dim * np.dtype(shard.layout.dtype).itemsize

    def _decode_update(self, update: bank_pb2.UpdateRequest):
        indices = tensors.decode(update.indices, "update.indices", dtypes=INDICES, ndim=1)
        features = tensors.decode(update.features, "update.features", dtypes=FLOATS, ndim=2)
        return indices, features, float(update.momentum), update.client_id, int(update.sequence)

    @_rpc
    def Describe(self, request, context):
        shard = self._ready()
        info = shard.describe()
        return bank_pb2.DescribeResponse(
            shard_id=info["shard_id"],
            num_shards=info["num_shards"],
            total_rows=info["total_rows"],
            dim=info["dim"],
            dtype=tensors.DTYPE_NAMES[info["dtype"]],
            rows_held=info["rows_held"],
            updates_applied=info["updates_applied"],
            rows_updated=info["rows_updated"],
            last_snapshot_tag=info["last_snapshot_tag"],
            max_message_bytes=self.max_message_bytes,
        )

    @_rpc
    def Lookup(self, request, context):
        shard = self._ready()
        indices = tensors.decode(request.indices, "indices", dtypes=INDICES, ndim=1)
        self._check_answer_size(len(indices) * self._row_bytes(shard), "indices")
        return wire.lookup_response(shard.lookup(indices))

    @_rpc
    def Sample(self, request, context):
        shard = self._ready()
        self._check_answer_size(request.k * (self._row_bytes(shard) + 8), "k")
        seed = request.seed if request.HasField("seed") else None
        return wire.sample_response(*shard.sample(request.k, seed))

    @_rpc
    def Update(self, request, context):
        shard = self._ready()
        applied = shard.momentum_update(*self._decode_update(request))
        return bank_pb2.UpdateResponse(applied=applied, updates_applied=shard.updates_applied)

    @_rpc
    def Step(self, request, context):
        shard = self._ready()
        update = self._decode_update(request.update) if request.HasField("update") else None
        lookup = tensors.decode_optional(request.lookup_indices, "lookup_indices", dtypes=INDICES, ndim=1)
        if request.sample_k < 0:
            raise InvalidArgument(f"sample_k must be >= 0, got {request.sample_k}")
        row_bytes = self._row_bytes(shard)
        n_lookup = 0 if lookup is None else len(lookup)
        self._check_answer_size(n_lookup * row_bytes + request.sample_k * (row_bytes + 8), "sample_k")
        seed = request.sample_seed if request.HasField("sample_seed") else None
        return wire.step_response(*shard.step(update, lookup, request.sample_k, seed))

    @_rpc
    def PartitionSum(self, request, context):
        shard = self._ready()
        queries = tensors.decode(request.queries, "queries", dtypes=FLOATS, ndim=2)
        self._check_answer_size(len(queries) * (shard.layout.dim + 2) * 4, "queries")
        m, s, w = shard.partition_sums(queries, request.temperature)
        return bank_pb2.PartitionSumResponse(
            max_logit=tensors.encode(m), sum_exp=tensors.encode(s), weighted_sum=tensors.encode(w)
        )

    @_rpc
    def TopK(self, request, context):
        shard = self._ready()
        queries = tensors.decode(request.queries, "queries", dtypes=FLOATS, ndim=2)
        self._check_answer_size(len(queries) * max(request.k, 0) * 12, "k")
        sims, indices = shard.topk(queries, request.k)
        return bank_pb2.TopKResponse(similarities=tensors.encode(sims), indices=tensors.encode(indices))

    def _snapshot_dir(self) -> str:
        if not self.snapshot_dir:
            raise InvalidArgument("this server has no --snapshot-dir; start it with one to snapshot")
        return self.snapshot_dir

    @_rpc
    def Snapshot(self, request, context):
        shard = self._ready()
        path, nbytes, seconds = shard.snapshot(self._snapshot_dir(), request.tag, self.keep_snapshots)
        log.info("snapshot %s: %d bytes in %.2fs", path, nbytes, seconds)
        return bank_pb2.SnapshotResponse(path=str(path), bytes=nbytes, seconds=seconds)

    @_rpc
    def Restore(self, request, context):
        shard = self._ready()
        directory = self._snapshot_dir()

        def loading():
            # Rows are read into the live array: from when this Restore holds the snapshot
            # lock (not while it waits for a snapshot to end) calls are turned away
            # (UNAVAILABLE, which clients retry) and health says NOT_SERVING.
            self._restoring = True
            self.set_serving(False)

        try:
            path = shard.restore_in_place(directory, request.tag or None, loading=loading)
        finally:
            self._restoring = False
            # A Restore that failed before the rows changed leaves the shard as it was;
            # one that failed half-way leaves it damaged: NOT_SERVING until a restart.
            self.set_serving(not shard.damaged)
        log.info("restored snapshot %s", path)
        return bank_pb2.RestoreResponse(tag=shard.last_snapshot_tag, path=str(path))


def add_to_server(servicer: MemoryBankServicer, server: grpc.Server) -> None:
    """Register the MemoryBank methods: the bulk answers written by `bank_server.wire`,
    everything else by protobuf (both speak bank.proto). Requests, smaller, are parsed
    by protobuf's C parser."""
    pb = bank_pb2
    # method: (request parser, answer writer); None hands gRPC the bytes `wire` wrote.
    codecs = {
        "Describe": (pb.DescribeRequest.FromString, pb.DescribeResponse.SerializeToString),
        "Lookup": (pb.LookupRequest.FromString, None),
        "Sample": (pb.SampleRequest.FromString, None),
        "Update": (pb.UpdateRequest.FromString, pb.UpdateResponse.SerializeToString),
        "Step": (pb.StepRequest.FromString, None),
        "PartitionSum": (pb.PartitionSumRequest.FromString, pb.PartitionSumResponse.SerializeToString),
        "TopK": (pb.TopKRequest.FromString, pb.TopKResponse.SerializeToString),
        "Snapshot": (pb.SnapshotRequest.FromString, pb.SnapshotResponse.SerializeToString),
        "Restore": (pb.RestoreRequest.FromString, pb.RestoreResponse.SerializeToString),
    }
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method), request_deserializer=parse, response_serializer=write
        )
        for method, (parse, write) in codecs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
