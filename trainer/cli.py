"""The `instdisc` command: one entry point, subcommands imported lazily so that
`instdisc bank serve` does not pay for torch."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instdisc", description="Instance Discrimination with a sharded memory bank.")
    commands = parser.add_subparsers(dest="command", required=True)

    bank = commands.add_parser("bank", help="the memory-bank service").add_subparsers(dest="bank_command", required=True)
    from bank_server.cli import add_serve_arguments

    add_serve_arguments(bank.add_parser("serve", help="serve one shard over gRPC"))

    bench = commands.add_parser("bench", help="benchmarks that print numbers").add_subparsers(
        dest="bench_command", required=True)
    from bank_server.bench import add_bench_arguments

    add_bench_arguments(bench.add_parser("bank", help="Step latency vs in-process bank and raw gRPC echo"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bank":
        from bank_server.cli import run_serve

        return run_serve(args)
    if args.command == "bench" and args.bench_command == "bank":
        from bank_server.bench import run_bench

        return run_bench(args)
    raise AssertionError(args)


if __name__ == "__main__":
    sys.exit(main())
