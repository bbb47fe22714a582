"""`instdisc bench parts`: where one shard's `Step` spends its time outside the network,
part by part, in this process (no transport: `instdisc bench bank`'s echo measures it),
and what a two-shard client adds: placing and merging the shards' negatives.

Each part runs the code the client and the server run, on a `StepWorkload` batch, and
reports its median. The answer's codec is timed twice in the same run: with
`bank_server.wire` (what the bank uses) and with protobuf's own messages (what any
client built from bank.proto alone does), so the difference is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bank_server import tensors, validate, wire
from bank_server.client import negative_places, placed_draws
from bank_server.servicer import MemoryBankServicer
from bank_server.shard import Layout, Shard
from benchmarks.args import positive_int
from benchmarks.workload import MOMENTUM, StepWorkload
from protos import bank_pb2

_CLIENT_ID = "0" * 32


def add_bench_parts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=positive_int, default=10**6, help="rows on the one shard")
    parser.add_argument("--dim", type=positive_int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--negatives", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--iters", type=positive_int, default=300)
    parser.add_argument("--json", dest="json_path", help="also write the results here as JSON")


def _median_ms(fn, iters: int) -> float:
    for i in range(max(3, iters // 10)):
        fn(i)
    seconds = []
    for i in range(iters):
        start = time.perf_counter()
        fn(i)
        seconds.append(time.perf_counter() - start)
    return 1e3 * float(np.median(seconds))


def _pb_request(idx, features, lookup, k, client_id: str = _CLIENT_ID) -> bank_pb2.StepRequest:
    request = bank_pb2.StepRequest(sample_k=k)
    update = request.update
    tensors.encode(idx, out=update.indices)
    tensors.encode(features, out=update.features)
    update.momentum, update.client_id, update.sequence = MOMENTUM, client_id, 1
    tensors.encode(lookup, out=request.lookup_indices)
    return request


def _pb_response(rows, sample_idx, sample_rows) -> bank_pb2.StepResponse:
    response = bank_pb2.StepResponse(update_applied=True)
    tensors.encode(rows, out=response.rows)
    tensors.encode(sample_idx, out=response.sample_indices)
    tensors.encode(sample_rows, out=response.sample_rows)
    return response


def measure(rows: int, dim: int, dtype: str, negatives: int, batch: int, iters: int) -> dict:
    work = StepWorkload(rows, dim, batch, seed=0)
    shard = Shard.create(Layout(0, 1, rows, dim, dtype))
    answer = shard.step(None, work.indices(1), negatives)
    _, looked_up, sample_idx, sample_rows = answer
    response = wire.step_response(True, looked_up, sample_idx, sample_rows)
    pb_request = _pb_request(work.indices(0), work.features(0), work.indices(1), negatives).SerializeToString()
    pb_response = _pb_response(looked_up, sample_idx, sample_rows).SerializeToString()
    assert response == pb_response  # the same bytes either way
    # The whole handler on the server's own servicer; no client id, so that every update
    # is applied rather than recognised as a retry.
    servicer = MemoryBankServicer(max_message_bytes=64 << 20)
    servicer.shard = Shard.create(Layout(0, 1, rows, dim, dtype))
    handled = [_pb_request(work.indices(i), work.features(i), work.indices(i + 1), negatives, client_id="")
               for i in range(16)]

    def server_decode(parsed):
        return (tensors.decode(parsed.update.indices, "i"), tensors.decode(parsed.update.features, "f"),
                tensors.decode(parsed.lookup_indices, "l"))

    def client_decode(parsed):
        out = np.empty((batch, dim), dtype)
        out[np.arange(batch)] = tensors.decode(parsed.rows, "rows")
        return out, tensors.decode(parsed.sample_indices, "s"), tensors.decode(parsed.sample_rows, "r")

    # What a client adds with two shards: where each shard's negatives go, and the merge
    # of their two answers into one i.i.d. sequence.
    rng = np.random.default_rng(0)
    places = negative_places(negatives, rows, 2, rng)
    halves = {s: [(sample_idx[:len(where)], sample_rows[:len(where)])] for s, where in enumerate(places)}

    def update(i):
        idx = work.indices(i)
        shard.momentum_update(idx, work.features(i), MOMENTUM)

    parts = {
        "client: whole-update check (only with 2+ shards)": lambda i: validate.update(
            work.indices(i), work.features(i), MOMENTUM, rows, dim),
        "client: build the request (protobuf)": lambda i: _pb_request(
            work.indices(i), work.features(i), work.indices(i + 1), negatives).SerializeToString(),
        "server: parse and decode the request (protobuf)": lambda i: server_decode(
            bank_pb2.StepRequest.FromString(pb_request)),
        "server: validate (the shard's checks)": lambda i: shard.to_local(validate.update(
            work.indices(i), work.features(i), MOMENTUM, rows, dim)[0], "update.indices"),
        "shard: update": update,
        "shard: lookup": lambda i: shard.lookup(work.indices(i)),
        "shard: sample": lambda i: shard.sample(negatives),
        "server: encode the answer (wire)": lambda i: wire.step_response(True, looked_up, sample_idx, sample_rows),
        "server: encode the answer (protobuf)": lambda i: _pb_response(
            looked_up, sample_idx, sample_rows).SerializeToString(),
        "server: the whole Step handler (decode, validate, update, reads, encode)": lambda i: servicer.Step(
            handled[i % len(handled)], None),
        "client: parse and decode (wire)": lambda i: client_decode(wire.parse_step_response(response)),
        "client: parse and decode (protobuf)": lambda i: client_decode(bank_pb2.StepResponse.FromString(pb_response)),
        "client, 2 shards: the negatives' places": lambda i: negative_places(negatives, rows, 2, rng),
        "client, 2 shards: merge the answers' negatives": lambda i: placed_draws(negatives, places, halves, ["", ""]),
    }
    result = {name: _median_ms(fn, iters) for name, fn in parts.items()}
    f32 = work.features(0).astype(np.float32)
    f16 = f32.astype(np.float16)
    result["cast (B, D) float32 -> float16"] = _median_ms(lambda i: f32.astype(np.float16), iters)
    result["cast (B, D) float16 -> float32"] = _median_ms(lambda i: f16.astype(np.float32), iters)
    return result


def run_bench_parts(args: argparse.Namespace) -> int:
    print(f"Step parts, one shard (and a two-shard client's negatives): N={args.rows:,} D={args.dim} {args.dtype} "
          f"K={args.negatives} B={args.batch}, medians of {args.iters} calls", flush=True)
    result = measure(args.rows, args.dim, args.dtype, args.negatives, args.batch, args.iters)
    width = max(map(len, result))
    for name, ms in result.items():
        print(f"  {name:<{width}}  {ms:7.3f} ms")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
