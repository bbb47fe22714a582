"""The per-worker training loop: data -> model -> bank -> steps -> eval -> report.

Runs inside Ray Train (`TorchTrainer`) on every worker; `trainer.launch` builds
the trainer. Each worker reaches the bank through a `BankFeed`, which owns the
step schedule (its docstring states it): each step's bank round trip runs while
the step computes. A step makes one collective, marked "sync point" below; DDP's
gradient all-reduce inside ``backward()`` is the other.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, DistributedSampler

from bank_server.client import BankClient, BankRpcError
from trainer import checkpoint
from trainer import distributed as dist
from trainer.augment import augment
from trainer.bank_feed import BankFeed
from trainer.config import Config
from trainer.data import batch_as_is, load_dataset, seeded_subset
from trainer.knn import correct_at, weighted_knn_scores
from trainer.launch import percent
from trainer.losses import PartitionEstimate, batch_log_z, nce_logits, nce_loss, softmax_loss
from trainer.models import Encoder
from trainer.schedule import learning_rate


class StopTraining(RuntimeError):
    """A reason to end the run on every worker at once, without Ray's retries (a
    retry would meet the same problem)."""


def load_datasets(config: Config):
    d = config.data
    train = load_dataset(d.name, d.root, train=True, download=d.download, image_size=d.image_size)
    test = load_dataset(d.name, d.root, train=False, download=d.download, image_size=d.image_size)
    return seeded_subset(train, d.subset, config.train.seed), seeded_subset(test, d.test_subset, config.train.seed + 1)


def image_stats(dataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units (from up to 10k images)."""
    images = getattr(dataset, "images", None)
    if images is None:
        sample = dataset.__getitems__(list(range(min(len(dataset), 512))))[0]
    else:
        sample = images[:10000]
    x = sample.float() / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()


def build_encoder(config: Config, channels: int, mean, std) -> Encoder:
    m = config.model
    return Encoder(m.arch, channels, m.dim, m.width, m.cifar_stem, mean=mean, std=std)


def _batches(dataset, indices: list[int], batch_size: int, workers: int):
    """Fixed-order batches of `indices` (evaluation and warm start)."""
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if workers:
        yield from DataLoader(dataset, batch_size=None, sampler=chunks, num_workers=workers,
                              collate_fn=batch_as_is)
    else:
        for chunk in chunks:
            yield dataset.__getitems__(chunk)


@torch.no_grad()
def embed(model, images: torch.Tensor, device) -> torch.Tensor:
    return model(images.to(device).float().div_(255)).float()


class Worker:
    """One worker's state; `run()` is the loop."""

    def __init__(self, config: Config, addresses: list[str], token: str | None, bank_actors: list[str] = ()):
        import ray.train
        import ray.train.torch

        self.config = config
        c = config
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(c.train.cpus_per_worker)))
        torch.manual_seed(c.train.seed + self.rank)

        # 1. data
        self.train_set, self.test_set = load_datasets(c)
        self.n = len(self.train_set)
        sample = self.train_set[0][0]
        channels, height = sample.shape[0], sample.shape[1]
        self.image_size = int(height)
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=c.train.seed, drop_last=True)
        self.batch = c.train.batch_size // self.world  # train.batch_size is the global batch
        self.loader = DataLoader(self.train_set, batch_size=self.batch, sampler=self.sampler,
                                 drop_last=True, num_workers=c.data.loader_workers, collate_fn=batch_as_is)
        if len(self.loader) == 0:
            raise ValueError(f"train.batch_size={c.train.batch_size} exceeds the {self.n} training images")

        # 2. model
        mean, std = image_stats(self.train_set)
        encoder = build_encoder(c, channels, mean, std)
        encoder.check_input(height)
        if self.device.type == "cuda":
            encoder = encoder.to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(encoder)
        self.encoder = self.model.module if hasattr(self.model, "module") else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=c.train.lr, momentum=c.train.momentum,
                                         weight_decay=c.train.weight_decay)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())

        # 3. bank (shards that are Ray actors are found again by name if they move)
        resolve = None
        if bank_actors:
            from bank_server.ray_bank import resolver

            resolve = resolver(list(bank_actors))
            # Where they serve now: a shard that restarted since the launch (before a Ray
            # Train retry, say) serves on another port than the launch recorded.
            addresses = [resolve(s, c.bank.timeout) for s in range(len(bank_actors))]
        self.client = BankClient(addresses, token=token, timeout=c.bank.timeout, tls_ca=c.bank.tls_ca,
                                 resolve=resolve)
        if (self.client.rows, self.client.dim) != (self.n, c.model.dim):
            raise ValueError(f"the bank at {addresses} holds {self.client.rows} rows x {self.client.dim} dims, but "
                             f"the dataset has {self.n} training images and model.dim={c.model.dim}")
        negatives = c.loss.negatives if c.loss.kind == "nce" else 0
        self.feed = BankFeed(self.client, negatives, c.bank.momentum, self.device, overlap=c.train.overlap)
        self.z = PartitionEstimate(c.loss.z_mode, c.loss.z_momentum)
        self.epoch, self.step, self.history = 0, 0, []

    # -- state ------------------------------------------------------------------

    def restore(self, saved) -> None:
        with saved.as_directory() as folder:
            state = checkpoint.load(folder, map_location=self.device)
        self.encoder.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.z.log_z = state["log_z"]
        problem = None
        if self.rank == 0:
            try:
                self.client.restore(state["bank_snapshot"])
            except BankRpcError as error:
                problem = (f"cannot resume: the checkpoint at epoch {self.epoch} needs bank snapshot "
                           f"{state['bank_snapshot']!r}, which the bank could not restore ({error})")
        problem = dist.broadcast_object(problem)  # every worker learns the outcome
        if problem:
            raise StopTraining(problem)
        self._log(f"resumed at epoch {self.epoch}, step {self.step}, bank snapshot {state['bank_snapshot']!r}")

    def _checkpoint_dir(self, bank_tag: str) -> str:
        folder = tempfile.mkdtemp(prefix="instdisc-ckpt-")
        checkpoint.save(folder, model=self.encoder.state_dict(), optimizer=self.optimizer.state_dict(),
                        encoder=self.encoder.spec(), image_size=self.image_size, epoch=self.epoch, step=self.step,
                        history=self.history, log_z=self.z.log_z, bank_snapshot=bank_tag,
                        bank_addresses=self.client.addresses, config=self.config.to_dict(),
                        git_sha=os.environ.get("INSTDISC_GIT_SHA", ""))
        return folder

    # -- pieces -----------------------------------------------------------------

    def _log(self, message: str) -> None:
        # Not print(): Ray Train patches it to log *and* echo, so every line came twice.
        if self.rank == 0:
            sys.stdout.write(f"[instdisc] {message}\n")
            sys.stdout.flush()

    def _my_share(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    @torch.no_grad()
    def fill_bank(self, why: str) -> None:
        """Set every bank row to the current encoder's feature of its un-augmented image
        (momentum 0). Before training this is the warm start: the first positives and
        negatives are features of the same network. Before kNN it is lemniscate's
        `recompute_memory`: neighbours are clean features, not an average of views."""
        start = time.perf_counter()
        # The bare module, not the DDP wrapper: workers embed different numbers of
        # batches here, and DDP's forward would wait for the others' buffer broadcast.
        self.encoder.eval()
        for images, idx, _ in _batches(self.train_set, self._my_share(self.n), 1024, self.config.data.loader_workers):
            self.feed.write(idx, embed(self.encoder, images, self.device))
        self.encoder.train()
        dist.barrier()
        self._log(f"bank {why}: {self.n} rows in {time.perf_counter() - start:.1f}s")

    @torch.no_grad()
    def evaluate(self, refresh: bool = True) -> tuple[float, float]:
        """Weighted kNN top-1 / top-5 of the test set against the bank rows."""
        c = self.config.eval
        if refresh and c.refresh_bank:
            self.fill_bank("refreshed for kNN")
        k = min(c.k, self.n)
        labels = self.train_set.labels
        num_classes = self.train_set.num_classes
        self.encoder.eval()
        correct1 = correct5 = total = 0
        for images, _, y in _batches(self.test_set, self._my_share(len(self.test_set)), 500,
                                     self.config.data.loader_workers):
            sims, idx = self.feed.topk(embed(self.encoder, images, self.device), k)
            scores = weighted_knn_scores(sims, labels[idx], num_classes, c.sigma)
            c1, c5 = correct_at(scores, y, (1, min(5, num_classes)))
            correct1, correct5, total = correct1 + c1, correct5 + c5, total + len(y)
        self.encoder.train()
        correct1, correct5, total = dist.all_reduce_sum([correct1, correct5, total])
        return correct1 / total, correct5 / total

    def _loss(self, f, positives, nce_logits_, log_z_batch: float):
        c = self.config.loss
        if c.kind == "softmax":
            return softmax_loss(f, positives, c.temperature, lambda q: self.feed.partition_sums(q, c.temperature))
        if self.z.log_z is None or self.z.mode == "ema":
            self.z.update(log_z_batch)
        return nce_loss(*nce_logits_, self.z.log_z, self.n)

    def train_epoch(self) -> dict:
        c = self.config
        self.sampler.set_epoch(self.epoch)
        steps = len(self.loader)
        nce = c.loss.kind == "nce"
        rtt_sum = wait_sum = 0.0
        loss_sum = torch.zeros((), device=self.device)  # on the device: read back only when logged
        start = time.perf_counter()
        for b, step in enumerate(self.feed.steps(self.loader)):
            lr = learning_rate(c.train.lr, self.epoch + b / steps, c.train.epochs, c.train.schedule,
                               c.train.milestones)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = augment(step.images.to(self.device, non_blocking=True).float().div_(255), c.augment)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                f = self.model(x).float()
            logits = nce_logits(f, step.positives, step.negatives, c.loss.temperature) if nce else None
            z_batch = math.exp(float(batch_log_z(*logits, self.n))) if nce else 0.0
            # Sync point, the step's one collective: whether any worker's features are
            # non-finite (they must not reach the bank), and NCE's Z, agreed as the mean
            # of the workers' estimates in linear space. With finite features and bank
            # rows the loss is finite (logits lie in [-1/tau, 1/tau]).
            finite_workers, z_sum = dist.all_reduce_sum([float(torch.isfinite(f).all()), z_batch])
            if finite_workers != self.world:
                raise StopTraining(f"the features became non-finite at epoch {self.epoch + 1}, step {self.step}; "
                                   "lower train.lr or raise loss.temperature")
            loss = self._loss(f, step.positives, logits, math.log(z_sum / self.world) if nce else 0.0)
            # To the host now, while only the forward (finished at the sync point) is behind
            # it; after backward() the copy would wait for the whole step.
            self.feed.push(step.indices, f)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.detach()
            rtt_sum += step.round_trip_s
            wait_sum += step.waited_s
            if self.rank == 0 and (b + 1) % c.train.log_every == 0:
                self._log_progress(b + 1, steps, time.perf_counter() - start, float(loss_sum), lr, rtt_sum, wait_sum)
        seconds = time.perf_counter() - start
        return {"loss": float(loss_sum) / steps, "epoch_seconds": seconds,
                "images_per_sec": steps * c.train.batch_size / seconds,
                "bank_rtt_ms": 1e3 * rtt_sum / steps, "bank_wait_ms": 1e3 * wait_sum / steps}

    def _log_progress(self, done: int, steps: int, elapsed: float, loss_sum: float, lr: float, rtt_sum: float,
                      wait_sum: float) -> None:
        c = self.config.train
        per_step = elapsed / done
        remaining = (steps - done + (c.epochs - self.epoch - 1) * steps) * per_step
        self._log(f"epoch {self.epoch + 1}/{c.epochs} step {done}/{steps} | {c.batch_size / per_step:,.0f} img/s | "
                  f"loss {loss_sum / done:.4f} | lr {lr:.4f} | bank rtt {1e3 * rtt_sum / done:.1f} ms "
                  f"(waited {1e3 * wait_sum / done:.1f} ms) | ETA {_duration(remaining)}")

    def run(self) -> dict:
        start = time.perf_counter()
        try:
            return self._run()
        except StopTraining as error:
            # Every worker raises this at the same point (the condition is all-reduced or
            # broadcast), so returning here ends the run cleanly.
            self._log(f"stopped: {error}")
            return {"history": self.history, "train_seconds": time.perf_counter() - start, "steps": self.step,
                    "error": str(error)}
        finally:
            self.feed.close()
            self.client.close()

    def _run(self) -> dict:
        import ray.train
        from ray.train import Checkpoint

        c = self.config
        saved = ray.train.get_checkpoint()
        if saved is not None:
            self.restore(saved)
        else:
            if c.bank.warm_start:
                self.fill_bank("warm start")
                top1, top5 = self.evaluate(refresh=False)
                self.history.append({"epoch": 0, "loss": float("nan"), "knn_top1": top1, "knn_top5": top5,
                                     "images_per_sec": 0.0, "epoch_seconds": 0.0, "bank_rtt_ms": 0.0,
                                     "bank_wait_ms": 0.0, "lr": c.train.lr})
                self._log(f"untrained encoder: kNN top-1 {percent(top1)} top-5 {percent(top5)}")
        train_start = time.perf_counter()
        while self.epoch < c.train.epochs:
            metrics = self.train_epoch()
            self.epoch += 1
            last = self.epoch == c.train.epochs
            if last or self.epoch % c.eval.every == 0:
                top1, top5 = self.evaluate()
            else:
                top1 = top5 = float("nan")
            metrics.update(epoch=self.epoch, knn_top1=top1, knn_top5=top5,
                           lr=learning_rate(c.train.lr, self.epoch, c.train.epochs, c.train.schedule,
                                            c.train.milestones))
            self.history.append(metrics)
            self._log(f"epoch {self.epoch}/{c.train.epochs} done in {metrics['epoch_seconds']:.1f}s | "
                      f"loss {metrics['loss']:.4f} | {metrics['images_per_sec']:,.0f} img/s | "
                      f"kNN top-1 {percent(top1)} top-5 {percent(top5)}")
            # The bank snapshot and the model checkpoint describe the same step.
            dist.barrier()
            tag = f"epoch-{self.epoch:04d}-step-{self.step}"
            folder = None
            if self.rank == 0:
                self.client.snapshot(tag)
                folder = self._checkpoint_dir(tag)
            ray.train.report({k: v for k, v in metrics.items()} | {"bank_snapshot": tag},
                             checkpoint=Checkpoint.from_directory(folder) if folder else None,
                             checkpoint_dir_name=f"epoch-{self.epoch:04d}")
        return {"history": self.history, "train_seconds": time.perf_counter() - train_start,
                "steps": self.step}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_func(loop_config: dict) -> dict:
    """Ray Train's per-worker entry point."""
    config = Config.from_dict(loop_config["config"])
    worker = Worker(config, loop_config["addresses"], loop_config.get("token"), loop_config.get("bank_actors", ()))
    return worker.run()
