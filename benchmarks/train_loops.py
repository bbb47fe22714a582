"""The two training loops `instdisc bench train` compares, same model, batch and loss:

(a) remote: BankClient to real shard servers (separate processes), with the step's
    round trip overlapped with compute unless ``--no-overlap``;
(b) in-process: the bank is a tensor on the training device; positives, negatives
    and the momentum update are index operations on it (the lemniscate way).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from trainer.augment import augment
from trainer.losses import PartitionEstimate, batch_log_z, sampled_logits, nce_loss, softmax_loss
from trainer.models import Encoder


class Trainer:
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

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, indices, labels) as a loader gives them; the labels are unused."""
        idx = self.batch_indices()
        return self.images[idx], idx, torch.zeros(len(idx), dtype=torch.long)

    def forward(self, images):
        x = augment(images.to(self.device, non_blocking=True).float().div_(255))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x)

    def loss(self, f, positives, negatives, partition_fn):
        a = self.args
        if a.loss == "softmax":
            return softmax_loss(f, positives, a.temperature, partition_fn)
        pos, neg = sampled_logits(f, positives, negatives, a.temperature)
        return nce_loss(pos, neg, self.z.update(float(batch_log_z(pos, neg, self.n))), self.n)

    def backward(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_inprocess(trainer: Trainer, steps: int, warmup: int) -> float:
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
        f = trainer.forward(trainer.images[idx])
        trainer.backward(trainer.loss(f, positives, negatives, partition_fn))
        with torch.no_grad():
            bank[idx] = F.normalize(0.5 * positives + 0.5 * f.detach(), dim=1)
    _sync(device)
    return steps * a.batch / (time.perf_counter() - start)


def run_remote(trainer: Trainer, addresses: list[str], steps: int, warmup: int) -> tuple[float, float, float]:
    from bank_server.client import BankClient
    from trainer.bank_feed import BankFeed

    a, device = trainer.args, trainer.device
    client = BankClient(addresses, timeout=120)
    negatives = a.negatives if a.loss == "nce" else 0
    feed = BankFeed(client, negatives, 0.5, device, overlap=not a.no_overlap)
    partition_fn = (lambda q: feed.partition_sums(q, a.temperature)) if a.loss == "softmax" else None
    waited = rtt = 0.0
    for i, step in enumerate(feed.steps(trainer.batch() for _ in range(warmup + steps))):
        if i == warmup:
            _sync(device)
            start, waited, rtt = time.perf_counter(), 0.0, 0.0
        waited += step.waited_s
        rtt += step.round_trip_s
        f = trainer.forward(step.images)
        trainer.backward(trainer.loss(f, step.positives, step.negatives, partition_fn))
        feed.push(step.indices, f)
    _sync(device)
    elapsed = time.perf_counter() - start
    feed.close()
    client.close()
    return steps * a.batch / elapsed, 1e3 * waited / steps, 1e3 * rtt / steps
