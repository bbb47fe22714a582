"""The floor for any gRPC design: a server whose one method does no work but answers
N zero bytes, N read from the request's first 8 bytes (the rest of the request only
has to cross the wire). ``python -m benchmarks.echo`` serves it on a loopback port
and prints ``listening on HOST:PORT``; `echo_calls` calls a few of them at once.

`RawCalls` sends ready-made request bytes to any unary method (the echo's, or a bank
shard's Step) and takes the answers as bytes: a call with nothing of our own around it."""

from __future__ import annotations

import struct
from concurrent import futures

import grpc

from bank_server.server import grpc_options

_SERVICE, _METHOD = "instdisc.bench.Echo", "Echo"
_MAX_MESSAGE = 64 << 20
_TIMEOUT_S = 60


def serve() -> None:
    cache: dict[int, bytes] = {}

    def echo(request: bytes, context) -> bytes:
        (size,) = struct.unpack_from("<q", request)
        if size not in cache:
            cache[size] = bytes(size)
        return cache[size]

    handler = grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=grpc_options(_MAX_MESSAGE))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


class RawCalls:
    """Call i sends ``payloads[i % len(payloads)][j]`` to server j, to all at once (the last
    as a blocking call while the others run on threads, as BankClient does), with no
    serializer and no parsing of the answers."""

    def __init__(self, addresses: list[str], method: str, payloads: list[list[bytes]]):
        if not addresses or not payloads or any(len(p) != len(addresses) for p in payloads):
            raise ValueError(f"every call needs one payload per server ({len(addresses)})")
        self._channels = [grpc.insecure_channel(a, options=grpc_options(_MAX_MESSAGE)) for a in addresses]
        self._calls = [channel.unary_unary(method) for channel in self._channels]
        self._payloads = payloads
        self._threads = futures.ThreadPoolExecutor(max_workers=max(1, len(addresses) - 1))

    def __call__(self, i: int) -> None:
        *others, (last_call, last_payload) = zip(self._calls, self._payloads[i % len(self._payloads)])
        pending = [self._threads.submit(call, payload, timeout=_TIMEOUT_S) for call, payload in others]
        try:
            last_call(last_payload, timeout=_TIMEOUT_S)
        finally:
            futures.wait(pending)  # none outlives this call, whichever failed
        for answer in pending:
            answer.result()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._threads.shutdown(wait=True, cancel_futures=True)


def echo_calls(addresses: list[str], sizes: list[tuple[int, int]]) -> RawCalls:
    """Echo servers standing in for a bank's shards: each call moves every shard's
    (request, answer) bytes of `sizes` to and from its server, all at once."""
    return RawCalls(addresses, f"/{_SERVICE}/{_METHOD}",
                    [[struct.pack("<q", answer) + bytes(max(0, request - 8)) for request, answer in sizes]])


if __name__ == "__main__":
    serve()
