"""Argument parsing for `instdisc bank serve` (also `python -m bank_server`) and
`instdisc bank reshard`."""

from __future__ import annotations

import argparse
import logging
import sys

from bank_server.errors import BankError
from bank_server.token_source import BankTokenMissing, read_token
from bank_server.update_log import FSYNC_MODES

# Kept here, not imported from the server, so that `instdisc --help` stays light.
THREADS_HELP = (
    "numpy BLAS threads in this shard process (default 1): a shard's work is memory-bound, and "
    "numpy's default of one spinning thread per core slows train workers on the same cores about 2x "
    "(410 against 962 img/s measured on 2 cores); raise it for a shard with cores of its own that "
    "serves the exact softmax or kNN"
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-id", type=int, required=True)
    parser.add_argument("--num-shards", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True, help="total rows N over all shards")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    parser.add_argument("--snapshot-dir", help="restore the newest snapshot from here; snapshot here on SIGTERM")
    parser.add_argument("--keep-snapshots", type=int, default=0, help="newest snapshots kept per shard (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-file", help="require 'authorization: Bearer <token>' with this file's token")
    parser.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=16.0,
        help="gRPC message limit: a client's Step to this shard is one message (its update, reads "
        "and negatives), and a client refuses a Step that might not fit, saying how much it needs",
    )
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get at SIGTERM")
    parser.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    parser.add_argument(
        "--fsync",
        choices=FSYNC_MODES,
        default="everysec",
        help="when the update log (kept with --snapshot-dir) reaches the disk: before each reply "
        "(always), once a second (everysec, the default: a process crash loses nothing, a "
        "machine crash up to a second), or when the kernel decides (no)",
    )
    parser.add_argument(
        "--snapshot-every",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also snapshot every SECONDS (tags periodic-<unix time>; the newest 2 are kept, "
        "apart from --keep-snapshots); 0: only on request and at SIGTERM",
    )
    parser.add_argument(
        "--allow-fresh",
        action="store_true",
        help="start from the seeded rows when the stored bank (LATEST, a snapshot, the log) cannot "
        "be read, instead of refusing to start",
    )
    parser.add_argument(
        "--fallback-snapshot",
        action="store_true",
        help="when the snapshot LATEST names is damaged or missing, use the newest good snapshot "
        "that the update log continues, replaying the log from it",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port at /metrics (0: off)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_serve(args: argparse.Namespace) -> int:
    from bank_server.server import ServerConfig, serve

    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.snapshot_every and args.snapshot_every < 1:
        print("error: --snapshot-every must be 0 (off) or at least 1 second", file=sys.stderr)
        return 2
    try:
        token = read_token(args.token_file)
    except BankTokenMissing as error:
        print(f"error: --token-file: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        shard_id=args.shard_id,
        num_shards=args.num_shards,
        rows=args.rows,
        dim=args.dim,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        snapshot_dir=args.snapshot_dir,
        keep_snapshots=args.keep_snapshots,
        seed=args.seed,
        token=token,
        threads=args.threads,
        fsync=args.fsync,
        snapshot_every=args.snapshot_every,
        allow_fresh=args.allow_fresh,
        fallback_snapshot=args.fallback_snapshot,
        metrics_port=args.metrics_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
    )
    try:
        return serve(config, grace=args.grace)
    except BankError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def add_reshard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write the bank stored in SOURCE (a --snapshot-dir of its shards) as a new bank of N shards in "
        "DEST, every row by global index byte for byte. SOURCE is only read; DEST appears only once whole."
    )
    parser.add_argument("source", metavar="SOURCE", help="the bank's --snapshot-dir (one shard-<id>/ per shard)")
    parser.add_argument("dest", metavar="DEST", help="a new folder: serve it with --snapshot-dir DEST --num-shards N")
    parser.add_argument("--shards", type=int, required=True, metavar="N", help="shards of the new bank")
    parser.add_argument(
        "--tag",
        help="reshard every shard's snapshot TAG (what a checkpoint naming it resumes from) instead of the "
        "state each shard would recover to; DEST's snapshots carry the same tag (default: 'resharded')",
    )


def run_reshard(args: argparse.Namespace) -> int:
    from bank_server.reshard import reshard

    try:
        done = reshard(args.source, args.dest, args.shards, args.tag)
    except (BankError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(done.describe(), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bank_server", description="Serve one memory-bank shard.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
