"""`instdisc bench train`: training images/s with the remote sharded bank against an
in-process bank tensor in the worker, same model, batch and loss, measured in one
run (the two loops: `benchmarks.train_loops`), in `--rounds` turns that alternate
between them: this machine's speed drifts by more than the difference between the
banks within a minute, and a drift would otherwise count against whichever ran second.

By default the trainer and the shard processes share every core, as bank actors beside
train workers on one node do: the ratio then also counts the bank's CPU taken from
training. ``--bank-cores N`` gives the shards cores of their own, as on a cluster where
the bank runs on its own CPUs: the ratio is then what the remote bank itself costs a
step (the client's work, and any round trip the overlap does not hide).

torch is imported when the command runs, not when its arguments are declared, so
that `instdisc --help` stays light.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import ExitStack

from benchmarks.args import positive_int
from benchmarks.processes import affinity, pin, start_bank_processes


def add_bench_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist, cifar10, ...")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--arch", default="small")
    parser.add_argument("--width", type=positive_int, default=32)
    parser.add_argument("--image-size", type=int, default=0, help="resize images to this side (0: native)")
    parser.add_argument("--loss", choices=("nce", "softmax"), default="nce")
    parser.add_argument("--negatives", type=positive_int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--shards", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=positive_int, default=4,
                        help="the steps run in this many turns alternating between the two banks, so that the "
                             "machine's drifts hit both alike")
    parser.add_argument("--device", default="auto", help="auto: cuda when available")
    parser.add_argument("--no-overlap", action="store_true", help="wait for each bank round trip")
    parser.add_argument("--bank-cores", type=int, default=0,
                        help="run the shard processes on the first N of this process's cores and both training "
                             "loops on the others, one torch thread per training core, as on a cluster where the bank "
                             "has CPUs of its own; 0: everything shares every core")
    parser.add_argument("--json", dest="json_path")


def split_cores(cores: list[int], bank_cores: int) -> tuple[set[int], set[int]]:
    """(the bank's cores, training's): the first `bank_cores` of `cores` (as `bench
    bank` gives its shards the first cores) and the rest; both empty for 0 (nothing is
    pinned)."""
    if bank_cores == 0:
        return set(), set()
    if not 0 < bank_cores < len(cores):
        raise SystemExit(f"--bank-cores must be in [0, {len(cores) - 1}]: this process may use {len(cores)} core(s), "
                         f"and training needs at least one")
    return set(cores[:bank_cores]), set(cores[bank_cores:])


def run_bench_train(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from benchmarks.train_loops import InProcessLoop, RemoteLoop, Trainer, images_per_sec
    from trainer.data import load_dataset

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # Only asked for when used: sched_getaffinity is Linux's, and the default pins nothing.
    cores = sorted(os.sched_getaffinity(0)) if args.bank_cores else []
    bank_cores, train_cores = split_cores(cores, args.bank_cores)
    dataset = load_dataset(args.data, args.data_root, train=True)
    images = dataset.images if hasattr(dataset, "images") else torch.stack(
        [dataset[i][0] for i in range(min(len(dataset), 20000))])
    if args.image_size:
        images = F.interpolate(images.float(), size=args.image_size, mode="bilinear").round().clamp(0, 255).byte()
    torch.manual_seed(0)
    print(f"train-step benchmark: {args.data} {tuple(images.shape[1:])} x {len(images):,}, {args.arch}, "
          f"{args.loss} (K={args.negatives}), batch {args.batch}, {args.shards} shard(s), {args.device}, "
          f"overlap {'off' if args.no_overlap else 'on'}", flush=True)
    with ExitStack() as stack:
        servers = start_bank_processes(stack, args.shards, len(images), 128, "float16")
        placement = {}
        if bank_cores:
            for server in servers:
                pin(server.proc.pid, bank_cores)
            pin(os.getpid(), train_cores)
            torch.set_num_threads(len(train_cores))
            # Read back, not assumed: what the report says is where the threads are.
            placement = {"bank_cpus": sorted(set().union(*(affinity(s.proc.pid) for s in servers))),
                         "train_cpus": sorted(affinity(os.getpid())), "torch_threads": torch.get_num_threads()}
            print(f"the bank on core(s) {placement['bank_cpus']}; training on core(s) {placement['train_cpus']} "
                  f"with {placement['torch_threads']} torch thread(s)", flush=True)
        loops = {"inprocess": InProcessLoop(Trainer(args, images)),
                 "remote": RemoteLoop(Trainer(args, images), [s.address for s in servers], args.warmup + args.steps)}
        stack.callback(loops["remote"].close)
        rates = images_per_sec(loops, args.steps, args.warmup, args.rounds, args.batch)
        remote, inprocess = rates["remote"], rates["inprocess"]
        waited_ms, rtt_ms = (1e3 * getattr(loops["remote"], f) / args.steps for f in ("waited_s", "round_trip_s"))
    result = {"remote_images_per_sec": remote, "inprocess_images_per_sec": inprocess, "ratio": remote / inprocess,
              "bank_wait_ms": waited_ms, "bank_rtt_ms": rtt_ms, "device": args.device, "arch": args.arch,
              "loss": args.loss, "negatives": args.negatives, "batch": args.batch, "shards": args.shards,
              "rows": len(images), "overlap": not args.no_overlap, "rounds": args.rounds,
              "bank_cores": args.bank_cores, **placement}
    print(f"(a) remote sharded bank : {remote:10,.0f} images/s  (waited {waited_ms:.2f} ms/step for the bank, "
          f"round trip {rtt_ms:.1f} ms)")
    print(f"(b) in-process bank     : {inprocess:10,.0f} images/s")
    print(f"ratio (a)/(b)           : {remote / inprocess:10.3f}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
