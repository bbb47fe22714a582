"""`instdisc bench train`: training images/s with the remote sharded bank against an
in-process bank tensor in the worker (the lemniscate way), same model, batch and
loss, measured in one run.

(a) remote: BankClient to real shard servers (separate processes), with the step's
    round trip overlapped with compute (``--no-overlap`` to see the difference);
(b) in-process: the bank is a tensor on the training device; positives, negatives
    and the momentum update are index operations on it.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack

import torch
import torch.nn.functional as F

from trainer.augment import augment
from trainer.data import load_dataset
from trainer.losses import PartitionEstimate, batch_log_z, nce_logits, nce_loss, softmax_loss
from trainer.models import Encoder


class _Trainer:
    """The parts of a training step shared by both banks."""

    def __init__(self, args, images: torch.Tensor):
        self.args, self.images, self.n = args, images, len(images)
        self.device = torch.device(args.device)
        self.model = Encoder(args.arch, images.shape[1], 128, args.width, True).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
        self.z = PartitionEstimate("ema")
        self.generator = torch.Generator().manual_seed(0)

    def batch_indices(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator)[:self.args.batch]

    def forward(self, idx):
        x = augment(self.images[idx].to(self.device, non_blocking=True).float().div_(255))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x)

    def loss(self, f, positives, negatives, partition_fn):
        a = self.args
        if a.loss == "softmax":
            return softmax_loss(f, positives, a.temperature, partition_fn)
        pos, neg = nce_logits(f, positives, negatives, a.temperature)
        return nce_loss(pos, neg, self.z.update(float(batch_log_z(pos, neg, self.n))), self.n)

    def backward(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_inprocess(trainer: _Trainer, steps: int, warmup: int) -> float:
    a, device = trainer.args, trainer.device
    bank = F.normalize(torch.rand(trainer.n, 128, device=device) - 0.5, dim=1)
    if a.loss == "softmax":
        def partition_fn(q):
            logits = q @ bank.T / a.temperature
            return torch.logsumexp(logits, 1), torch.softmax(logits, 1) @ bank
    else:
        partition_fn = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        idx = trainer.batch_indices().to(device)
        positives = bank[idx]
        negatives = bank[torch.randint(0, trainer.n, (a.negatives,), device=device)]
        f = trainer.forward(idx)
        trainer.backward(trainer.loss(f, positives, negatives, partition_fn))
        with torch.no_grad():
            bank[idx] = F.normalize(0.5 * positives + 0.5 * f.detach(), dim=1)
    _sync(device)
    return steps * a.batch / (time.perf_counter() - start)


def run_remote(trainer: _Trainer, addresses: list[str], steps: int, warmup: int) -> tuple[float, float, float]:
    from bank_server.client import BankClient
    from trainer.bank_feed import BankFeed

    a, device = trainer.args, trainer.device
    client = BankClient(addresses, timeout=120)
    negatives = a.negatives if a.loss == "nce" else 0
    feed = BankFeed(client, negatives, 0.5, device, overlap=not a.no_overlap)
    partition_fn = (lambda q: client.partition_sums(q.cpu(), a.temperature)) if a.loss == "softmax" else None
    idx = trainer.batch_indices()
    feed.submit(None, idx)
    update, waited = None, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start, waited = time.perf_counter(), 0.0
        upcoming = trainer.batch_indices()
        positives, negative_rows = feed.take()
        waited += feed.wait_s
        feed.submit(update, upcoming)
        f = trainer.forward(idx)
        trainer.backward(trainer.loss(f, positives, negative_rows, partition_fn))
        update, idx = (idx, f.detach()), upcoming
    _sync(device)
    elapsed = time.perf_counter() - start
    feed.close()
    rtt = feed.round_trip_s
    client.close()
    return steps * a.batch / elapsed, 1e3 * waited / steps, 1e3 * rtt


def run_bench_train(args: argparse.Namespace) -> int:
    from bank_server.bench import _spawn

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dataset = load_dataset(args.data, args.data_root, train=True)
    images = dataset.images if hasattr(dataset, "images") else torch.stack(
        [dataset[i][0] for i in range(min(len(dataset), 20000))])
    if args.image_size:
        images = F.interpolate(images.float(), size=args.image_size, mode="bilinear").round().clamp(0, 255).byte()
    torch.manual_seed(0)
    print(f"train-step benchmark: {args.data} {tuple(images.shape[1:])} x {len(images):,}, {args.arch}, "
          f"{args.loss} (K={args.negatives}), batch {args.batch}, {args.shards} shard(s), {args.device}, "
          f"overlap {'off' if args.no_overlap else 'on'}", flush=True)
    inprocess = run_inprocess(_Trainer(args, images), args.steps, args.warmup)
    with ExitStack() as stack:
        addresses = [_spawn(["-m", "bank_server", "--shard-id", str(s), "--num-shards", str(args.shards),
                             "--rows", str(len(images)), "--dim", "128", "--port", "0"], stack)
                     for s in range(args.shards)]
        remote, waited_ms, rtt_ms = run_remote(_Trainer(args, images), addresses, args.steps, args.warmup)
    result = {"remote_images_per_sec": remote, "inprocess_images_per_sec": inprocess, "ratio": remote / inprocess,
              "bank_wait_ms": waited_ms, "bank_rtt_ms": rtt_ms, "device": args.device, "arch": args.arch,
              "loss": args.loss, "negatives": args.negatives, "batch": args.batch, "shards": args.shards,
              "rows": len(images), "overlap": not args.no_overlap}
    print(f"(a) remote sharded bank : {remote:10,.0f} images/s  (waited {waited_ms:.2f} ms/step for the bank, "
          f"round trip {rtt_ms:.1f} ms)")
    print(f"(b) in-process bank     : {inprocess:10,.0f} images/s")
    print(f"ratio (a)/(b)           : {remote / inprocess:10.3f}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
