"""`instdisc bench train`: what does the remote bank cost training? Images/s of the same
model, batch and loss with (a) `BankClient` to real shard servers (separate processes),
through the trainer's `BankFeed`, which overlaps each step's round trip with compute,
and (b) the bank as a tensor on the training device, positives, negatives and the
momentum update being index operations on it (the lemniscate way). The steps run in
`--rounds` turns alternating between the two, so that the machine's drifts hit both alike.

By default the trainer and the shard processes share every core, as bank actors beside
train workers on one node do: the ratio then also counts the bank's CPU taken from
training. ``--bank-cores N`` gives the shards cores of their own, as on a cluster where
the bank has its own CPUs: the ratio is then what the remote bank itself costs a step.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

from bank_server.client import BankClient
from benchmarks.args import positive_int
from benchmarks.servers import affinity, pin, start_shards
from trainer.augment import augment
from trainer.bank_feed import BankFeed
from trainer.data import load_dataset
from trainer.losses import PartitionEstimate, batch_log_z, nce_loss, sampled_logits, softmax_loss
from trainer.models import Encoder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist, cifar10, ...")
    parser.add_argument("--arch", default="small")
    for flag, default in (("--width", 32), ("--negatives", 4096), ("--batch", 128), ("--shards", 2), ("--steps", 60)):
        parser.add_argument(flag, type=positive_int, default=default)
    parser.add_argument("--image-size", type=int, default=0, help="resize images to this side (0: native)")
    parser.add_argument("--loss", choices=("nce", "softmax"), default="nce")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=positive_int, default=4, help="turns, alternating between the banks")
    parser.add_argument("--device", default="auto", help="auto: cuda when available")
    cores = "the shards on the first N of this process's cores, training on the rest; 0: all share every core"
    parser.add_argument("--bank-cores", type=int, default=0, help=cores)
    parser.add_argument("--json", dest="json_path")


def split_cores(cores: list[int], bank_cores: int) -> tuple[set[int], set[int]]:
    """(the bank's cores, training's): the first `bank_cores` of `cores` and the rest."""
    if not 0 < bank_cores < len(cores):
        raise SystemExit(f"--bank-cores must be in [0, {len(cores) - 1}]: training needs one of the {len(cores)}")
    return set(cores[:bank_cores]), set(cores[bank_cores:])


class Trainer:
    """A training step's parts shared by both banks: the model, augmentation, the loss."""

    def __init__(self, args, images):
        self.args, self.images, self.n = args, images, len(images)
        self.device = torch.device(args.device)
        self.model = Encoder(args.arch, images.shape[1], 128, args.width, True).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
        self.z = PartitionEstimate("ema")
        self.generator = torch.Generator().manual_seed(0)

    def batch_indices(self):
        return torch.randperm(self.n, generator=self.generator)[: self.args.batch]

    def step(self, images, positives, negatives, partition_fn):
        """Forward, loss, backward, optimizer step; the features, for the bank's update."""
        a = self.args
        x = augment(images.to(self.device, non_blocking=True).float().div_(255))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            f = self.model(x).float()
        if a.loss == "softmax":
            loss = softmax_loss(f, positives, a.temperature, partition_fn)
        else:
            pos, neg = sampled_logits(f, positives, negatives, a.temperature)
            loss = nce_loss(pos, neg, self.z.update(float(batch_log_z(pos, neg, self.n))), self.n)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return f.detach()


class InProcessLoop:
    """(b): the bank is a tensor on the training device."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.bank = F.normalize(torch.rand(trainer.n, 128, device=trainer.device) - 0.5, dim=1)

    def partition_fn(self, q):  # log Z and the softmax-weighted row of every query, exactly
        logits = q @ self.bank.T / self.trainer.args.temperature
        return torch.logsumexp(logits, 1), torch.softmax(logits, 1) @ self.bank

    def run(self, steps: int) -> None:
        t, bank = self.trainer, self.bank
        for _ in range(steps):
            idx = t.batch_indices().to(t.device)
            positives = bank[idx]
            negatives = bank[torch.randint(0, t.n, (t.args.negatives,), device=t.device)]
            f = t.step(t.images[idx], positives, negatives, self.partition_fn)
            with torch.no_grad():
                bank[idx] = F.normalize(0.5 * positives + 0.5 * f, dim=1)


class RemoteLoop:
    """(a): the remote bank through `BankFeed`; `waited_s` and `round_trip_s` add up
    over the steps run."""

    def __init__(self, trainer: Trainer, client: BankClient, total_steps: int):
        a = trainer.args
        self.trainer, self.client = trainer, client
        self.feed = BankFeed(client, a.negatives if a.loss == "nce" else 0, 0.5, trainer.device)
        self._steps = self.feed.steps(
            (trainer.images[i], i, torch.zeros(len(i), dtype=torch.long))
            for i in (trainer.batch_indices() for _ in range(total_steps))
        )
        self.waited_s = self.round_trip_s = 0.0

    def partition_fn(self, q):
        log_z, expected = self.client.partition_sums(q.detach().float().cpu().numpy(), self.trainer.args.temperature)
        return torch.from_numpy(log_z).to(q.device), torch.from_numpy(expected).to(q.device)

    def run(self, steps: int) -> None:
        t = self.trainer
        for _ in range(steps):
            step = next(self._steps)
            self.waited_s += step.waited_s
            self.round_trip_s += step.round_trip_s
            self.feed.push(step.indices, t.step(step.images, step.positives, step.negatives, self.partition_fn))

    def close(self) -> None:
        try:
            next(self._steps, None)  # after the last step: its update goes out
        finally:
            self._steps.close()
            self.feed.close()


def images_per_sec(loops: dict, steps: int, rounds: int, batch: int, device: torch.device) -> dict:
    """Each loop's images/s over `steps` steps run in `rounds` turns that alternate
    between the loops (which goes first alternates too); each turn waits for `device`."""
    seconds = dict.fromkeys(loops, 0.0)
    names = list(loops)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            loops[name].run(len(range(r, steps, rounds)))
            sync()
            seconds[name] += time.perf_counter() - start
    return {name: steps * batch / seconds[name] for name in names}


def run(args: argparse.Namespace) -> int:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    images = load_dataset(args.data, train=True).images
    if args.image_size:
        images = F.interpolate(images.float(), size=args.image_size, mode="bilinear").round().clamp(0, 255).byte()
    torch.manual_seed(0)
    print(f"bench train: {args.data} {tuple(images.shape[1:])} x {len(images):,}, {args.arch}, {args.loss}", flush=True)
    placement = {}
    with ExitStack() as stack:
        servers = start_shards(stack, args.shards, len(images), 128, "float16")
        if args.bank_cores:
            bank_cores, train_cores = split_cores(sorted(os.sched_getaffinity(0)), args.bank_cores)
            for server in servers:
                pin(server.proc.pid, bank_cores)
            pin(os.getpid(), train_cores)
            torch.set_num_threads(len(train_cores))
            # Read back, not assumed: what the report says is where the threads are.
            bank_cpus = sorted(set().union(*(affinity(s.proc.pid) for s in servers)))
            placement = dict(bank_cpus=bank_cpus, train_cpus=sorted(affinity(os.getpid())))
            placement["torch_threads"] = torch.get_num_threads()
            print(f"the bank on core(s) {bank_cpus}; training: {placement}", flush=True)
        client = stack.enter_context(BankClient([s.address for s in servers], timeout=120))
        remote = RemoteLoop(Trainer(args, images), client, args.warmup + args.steps)
        stack.callback(remote.close)
        loops = {"inprocess": InProcessLoop(Trainer(args, images)), "remote": remote}
        for loop in loops.values():
            loop.run(args.warmup)
        remote.waited_s = remote.round_trip_s = 0.0  # the figures are of the timed steps
        rates = images_per_sec(loops, args.steps, args.rounds, args.batch, remote.trainer.device)
    waited_ms, rtt_ms = (1e3 * seconds / args.steps for seconds in (remote.waited_s, remote.round_trip_s))
    ratio = rates["remote"] / rates["inprocess"]
    result = dict(remote_images_per_sec=rates["remote"], inprocess_images_per_sec=rates["inprocess"], ratio=ratio)
    result |= dict(bank_wait_ms=waited_ms, bank_rtt_ms=rtt_ms, rows=len(images), **placement)
    result |= {key: getattr(args, key) for key in "device arch loss negatives batch shards rounds bank_cores".split()}
    print(f"(a) remote sharded bank : {rates['remote']:10,.0f} images/s  (waited {waited_ms:.2f} ms/step for it)")
    print(f"(b) in-process bank     : {rates['inprocess']:10,.0f} images/s")
    print(f"ratio (a)/(b)           : {ratio:10.3f}", flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0
