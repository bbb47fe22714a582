"""The floor for any gRPC design: a unary method that does no work but answer N zero
bytes, N read from the request's first 8 bytes (the rest of the request only has to
cross the wire). ``python -m benchmarks.echo`` serves it on a loopback port and prints
``listening on HOST:PORT``; `EchoCalls` calls several at once, as a client fans a Step
out to its shards."""

from __future__ import annotations

import struct
from concurrent import futures

import grpc

_METHOD = "/instdisc.bench.Echo/Echo"
_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def serve() -> None:
    answers: dict[int, bytes] = {}

    def echo(request: bytes, context) -> bytes:
        (size,) = struct.unpack_from("<q", request)
        return answers.setdefault(size, bytes(size))

    service, method = _METHOD[1:].split("/")
    handler = grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


class EchoCalls:
    """Call i sends server j `sizes[j][0]` bytes and gets `sizes[j][1]` back, to all
    servers at once (the last on this thread while the others run on threads)."""

    def __init__(self, addresses: list[str], sizes: list[tuple[int, int]]):
        self._channels = [grpc.insecure_channel(a, options=_OPTIONS) for a in addresses]
        self._calls = [channel.unary_unary(_METHOD) for channel in self._channels]
        self._payloads = [struct.pack("<q", answer) + bytes(max(0, request - 8)) for request, answer in sizes]
        self._threads = futures.ThreadPoolExecutor(max_workers=max(1, len(addresses) - 1))

    def __call__(self, i: int) -> None:
        *others, (last_call, last_payload) = zip(self._calls, self._payloads)
        pending = [self._threads.submit(call, payload, timeout=60) for call, payload in others]
        last_call(last_payload, timeout=60)
        for answer in pending:
            answer.result()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._threads.shutdown()


if __name__ == "__main__":
    serve()
