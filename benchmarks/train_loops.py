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


class InProcessLoop:
    """(b): the bank is a tensor on the training device (the lemniscate way)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        a, device = trainer.args, trainer.device
        self.bank = F.normalize(torch.rand(trainer.n, 128, device=device) - 0.5, dim=1)
        if a.loss == "softmax":
            def partition_fn(q):
                logits = q @ self.bank.T / a.temperature
                return torch.logsumexp(logits, 1), torch.softmax(logits, 1) @ self.bank
            self.partition_fn = partition_fn
        else:
            self.partition_fn = None

    def warm_up(self, steps: int) -> None:
        self.run(steps)

    def run(self, steps: int) -> float:
        """Make `steps` training steps; their seconds."""
        trainer, a, bank = self.trainer, self.trainer.args, self.bank
        _sync(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            idx = trainer.batch_indices().to(trainer.device)
            positives = bank[idx]
            negatives = bank[torch.randint(0, trainer.n, (a.negatives,), device=trainer.device)]
            f = trainer.forward(trainer.images[idx])
            trainer.backward(trainer.loss(f, positives, negatives, self.partition_fn))
            with torch.no_grad():
                bank[idx] = F.normalize(0.5 * positives + 0.5 * f.detach(), dim=1)
        _sync(trainer.device)
        return time.perf_counter() - start


class RemoteLoop:
    """(a): BankClient to real shard servers, through the trainer's BankFeed; `waited_s`
    and `round_trip_s` add up over the steps run."""

    def __init__(self, trainer: Trainer, addresses: list[str], total_steps: int):
        from bank_server.client import BankClient
        from trainer.bank_feed import BankFeed

        a = trainer.args
        self.trainer = trainer
        self.client = BankClient(addresses, timeout=120)
        self.feed = BankFeed(self.client, a.negatives if a.loss == "nce" else 0, 0.5, trainer.device,
                             overlap=not a.no_overlap)
        self.partition_fn = (lambda q: self.feed.partition_sums(q, a.temperature)) if a.loss == "softmax" else None
        self._steps = self.feed.steps(trainer.batch() for _ in range(total_steps))
        self.waited_s = self.round_trip_s = 0.0
        self._between_steps = True  # False while a turn runs: a turn that raised left a step unpushed

    def warm_up(self, steps: int) -> None:
        self.run(steps)
        self.waited_s = self.round_trip_s = 0.0  # the figures are of the timed steps

    def run(self, steps: int) -> float:
        trainer = self.trainer
        self._between_steps = False
        _sync(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            step = next(self._steps)
            self.waited_s += step.waited_s
            self.round_trip_s += step.round_trip_s
            f = trainer.forward(step.images)
            trainer.backward(trainer.loss(f, step.positives, step.negatives, self.partition_fn))
            self.feed.push(step.indices, f)
        self.feed.settle()  # the RPC in flight is this loop's work, not the other loop's
        _sync(trainer.device)
        self._between_steps = True
        return time.perf_counter() - start

    def close(self) -> None:
        try:
            if self._between_steps:
                next(self._steps, None)  # after the last step: its update goes out
        finally:
            self._steps.close()
            self.feed.close()
            self.client.close()


def images_per_sec(loops: dict, steps: int, warmup: int, rounds: int, batch: int) -> dict:
    """Each loop's images/s over `steps` steps, run in `rounds` turns that alternate
    between the loops (which goes first alternates too), after `warmup` steps each, so
    that the machine's drifts hit every loop alike."""
    for loop in loops.values():
        loop.warm_up(warmup)
    seconds = dict.fromkeys(loops, 0.0)
    names = list(loops)
    per_round = [len(range(r, steps, rounds)) for r in range(rounds)]
    for r, n in enumerate(filter(None, per_round)):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name] += loops[name].run(n)
    return {name: steps * batch / seconds[name] for name in names}
