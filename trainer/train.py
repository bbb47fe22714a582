"""The per-worker training loop: data -> model -> bank -> steps -> eval -> report.

Runs inside Ray Train (`TorchTrainer`) on every worker; `trainer.launch` builds
the trainer. Each worker reaches the bank through a `BankFeed`, which owns the
step schedule (its docstring states it): each step's bank round trip runs while
the step computes. A step makes one collective, marked "sync point" below; DDP's
gradient all-reduce inside ``backward()`` is the other.

Evaluation reads and never writes the bank: kNN searches the bank rows as they are
(``eval.source=bank``) or features of the train images computed for it
(``eval.source=fresh``). Rewriting the bank from clean images is a training step of
its own (``train.refresh_bank_every``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from bank_server.client import BankClient, BankRpcError
from bank_server.ray_bank import read_token, resolver
from trainer import checkpoint
from trainer import distributed as dist
from trainer.augment import augment
from trainer.bank_feed import BankFeed
from trainer.config import Config
from trainer.evaluate import knn_correct
from trainer.input import open_input, streamed
from trainer.knn import correct_at, weighted_knn_scores
from trainer.launch import below_untrained, percent
from trainer.losses import (PartitionEstimate, accidental_hits, batch_log_z, infonce_loss, nce_loss, sampled_logits,
                            softmax_loss)
from trainer.models import Encoder
from trainer.schedule import lr_at_step, run_length


# kNN neighbours labelled at once (test queries x k): bounds evaluation's memory on
# any test set, and lets a streamed dataset read each row group's labels once per lot.
KNN_LABELS_AT_ONCE = 1 << 20


class LoopStarts:
    """Counts the train loop's starts in one launch, as a named Ray actor that the launch
    creates and reads at the end: Ray Train restarts every worker when one fails
    (``train.max_failures``), and a start from a checkpoint alone cannot tell such a
    restart from the resume of an earlier launch."""

    def __init__(self):
        self._epochs: list[int] = []

    def started(self, epoch: int) -> int:
        """Rank 0 starts the loop at `epoch` (its checkpoint's; 0 when none): which start this is."""
        self._epochs.append(epoch)
        return len(self._epochs)

    def restarts(self) -> list[int]:
        """The checkpoint epoch each restart went on from (0: none yet), oldest first."""
        return self._epochs[1:]


class StopTraining(RuntimeError):
    """A reason to end the run on every worker at once, without Ray's retries (a
    retry would meet the same problem)."""


def build_encoder(config: Config, channels: int, mean, std) -> Encoder:
    m = config.model
    return Encoder(m.arch, channels, m.dim, m.width, m.cifar_stem, mean=mean, std=std)


@torch.no_grad()
def embed(model, images: torch.Tensor, device) -> torch.Tensor:
    return model(images.to(device).float().div_(255)).float()


class Worker:
    """One worker's state; `run()` is the loop."""

    def __init__(self, config: Config, addresses: list[str], token: str | None, bank_actors: list[str] = (),
                 starts: str | None = None):
        import ray.train
        import ray.train.torch

        self.config = config
        c = config
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(c.train.cpus_per_worker)))
        torch.manual_seed(c.train.seed + self.rank)

        # 1. data: in memory, or this worker's share streamed (trainer.input)
        self.input = open_input(c, self.rank, self.world, on_gpu=self.device.type == "cuda")
        self.n = self.input.rows
        channels, height = self.input.channels, self.input.side
        self.image_size = int(height)
        self.length = run_length(self.n, c.train.batch_size, c.train.epochs, c.train.steps)
        if self.input.batches_per_epoch() != self.length.steps_per_epoch:  # launch printed it by the same rule
            raise AssertionError(f"{self.input.batches_per_epoch()} batches per epoch, "
                                 f"expected {self.length.steps_per_epoch}")

        # 2. model
        mean, std = self.input.stats()
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
            resolve = resolver(list(bank_actors))
            # Where they serve now: a shard that restarted since the launch (before a Ray
            # Train retry, say) serves on another port than the launch recorded.
            addresses = [resolve(s, c.bank.timeout) for s in range(len(bank_actors))]
        self.client = BankClient(addresses, token=token, timeout=c.bank.timeout, tls_ca=c.bank.tls_ca,
                                 resolve=resolve)
        if (self.client.rows, self.client.dim) != (self.n, c.model.dim):
            raise ValueError(f"the bank at {addresses} holds {self.client.rows} rows x {self.client.dim} dims, but "
                             f"the dataset has {self.n} training images and model.dim={c.model.dim}")
        negatives = c.loss.negatives if c.loss.kind in ("nce", "infonce") else 0
        self.feed = BankFeed(self.client, negatives, c.bank.momentum, self.device, overlap=c.train.overlap)
        self.z = PartitionEstimate(c.loss.z_mode, c.loss.z_momentum)
        # history: one dict per epoch (epoch 0: the untrained encoder); step_log: one per
        # progress line (rank 0), for TensorBoard. Both travel in the checkpoint.
        self.epoch, self.step, self.history, self.step_log = 0, 0, [], []
        self.epochs = self.length.epochs  # the run's last epoch; _run counts it again after a resume
        # Bank outages that workers saw before this start (a checkpoint carries them); this
        # start's are asked of every worker's client when a checkpoint or the end needs them.
        self.earlier_outages: list[dict] = []
        self.starts = starts

    # -- state ------------------------------------------------------------------

    def restore(self, saved) -> None:
        with saved.as_directory() as folder:
            state = checkpoint.load(folder, map_location=self.device)
        trained_on, reading = state.get("dataset"), self.input.fingerprint()
        if trained_on is not None and trained_on["sha256"] != reading["sha256"]:  # absent from older checkpoints
            raise StopTraining(f"cannot resume: the checkpoint at epoch {state['epoch']} was trained on another "
                               f"dataset ({_dataset_words(trained_on)}) than this run reads ({_dataset_words(reading)})"
                               "; resume with the same data.* or start a new run (another --name or --output-dir)")
        self.encoder.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.step_log = state.get("step_log", [])  # absent from checkpoints older than it
        self.earlier_outages = state.get("bank_outages", [])
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

    def _checkpoint_dir(self, bank_tag: str, outages: list[dict]) -> str:
        folder = tempfile.mkdtemp(prefix="instdisc-ckpt-")
        checkpoint.save(folder, model=self.encoder.state_dict(), optimizer=self.optimizer.state_dict(),
                        encoder=self.encoder.spec(), image_size=self.image_size, epoch=self.epoch, step=self.step,
                        history=self.history, step_log=self.step_log, log_z=self.z.log_z, bank_snapshot=bank_tag,
                        bank_addresses=self.client.addresses, config=self.config.to_dict(),
                        git_sha=os.environ.get("INSTDISC_GIT_SHA", ""), bank_outages=outages,
                        dataset=self.input.fingerprint())
        return folder

    def bank_outages(self) -> list[dict]:
        """Every bank outage a worker's client saw in this run, with its rank: those before
        this start (from the checkpoint) and every worker's since. A collective: every
        worker calls it at the same point. Those that a failed worker saw after its last
        checkpoint are lost with it."""
        mine = [outage | {"rank": self.rank} for outage in self.client.outages()]
        return self.earlier_outages + [o for share in dist.all_gather_object(mine) for o in share]

    # -- pieces -----------------------------------------------------------------

    def _log(self, message: str) -> None:
        # Not print(): Ray Train patches it to log *and* echo, so every line came twice.
        if self.rank == 0:
            sys.stdout.write(f"[instdisc] {message}\n")
            sys.stdout.flush()

    @torch.no_grad()
    def _clean_features(self):
        """(indices, unit features) of this worker's share of the train images,
        un-augmented, by the current encoder, in batches."""
        # The bare module, not the DDP wrapper: workers embed different numbers of
        # batches here, and DDP's forward would wait for the others' buffer broadcast.
        self.encoder.eval()
        try:
            for images, idx, _ in self.input.share("train", 1024):
                yield idx, embed(self.encoder, images, self.device)
        finally:
            self.encoder.train()

    def fill_bank(self, why: str) -> float:
        """Set every bank row to the current encoder's feature of its un-augmented image
        (momentum 0); returns the seconds it took. Before training this is the warm
        start: the first positives and negatives are features of the same network.
        Every train.refresh_bank_every epochs it is lemniscate's `recompute_memory`, a
        part of training: the following steps read those rows."""
        start = time.perf_counter()
        for idx, features in self._clean_features():
            self.feed.write(idx, features)
        dist.barrier()
        seconds = time.perf_counter() - start
        self._log(f"bank {why}: {self.n} rows in {seconds:.1f} s")
        return seconds

    @torch.no_grad()
    def evaluate(self, source: str) -> tuple[float, float, float]:
        """Weighted kNN (top-1, top-5, seconds) of the test set against `source`: the
        bank rows as they are, or fresh features of the train images held here. Either
        way the bank is only read."""
        start = time.perf_counter()
        c = self.config.eval
        k = min(c.k, self.n)
        num_classes = self.input.num_classes
        index = labels = None
        if source == "fresh":  # only for datasets in memory (config.validate)
            index = self._fresh_index()
            labels = self.input.labels_at(torch.arange(self.n)).to(index.device)
        self.encoder.eval()
        counts = torch.zeros(3, dtype=torch.long)  # correct top-1, correct top-5, total
        neighbours = []  # (sims, bank rows, test labels) per batch, labelled a bounded lot at a time
        for images, _, y in self.input.share("test", 500):
            queries = embed(self.encoder, images, self.device)
            if index is None:
                neighbours.append((*self.feed.topk(queries, k), y))
                if sum(idx.numel() for _, idx, _ in neighbours) >= KNN_LABELS_AT_ONCE:
                    counts += self._score_neighbours(neighbours, num_classes)
                    neighbours = []
            else:
                c1, c5 = knn_correct(index, labels, queries, y.to(index.device), num_classes, k, c.sigma)
                counts += torch.tensor([c1, c5, len(y)])
        counts += self._score_neighbours(neighbours, num_classes)
        self.encoder.train()
        correct1, correct5, total = counts.tolist()
        correct1, correct5, total = dist.all_reduce_sum([correct1, correct5, total])
        return correct1 / total, correct5 / total, time.perf_counter() - start

    def _score_neighbours(self, neighbours: list[tuple], num_classes: int) -> torch.Tensor:
        """(correct top-1, correct top-5, queries) of test batches' bank neighbours. Their
        train labels are read in one go: a streamed dataset reads them from the row
        groups those rows are in."""
        if not neighbours:
            return torch.zeros(3, dtype=torch.long)
        labels = self.input.labels_at(torch.cat([idx.reshape(-1) for _, idx, _ in neighbours]))
        counts = [0, 0, 0]
        for (sims, idx, y), found in zip(neighbours, labels.split([idx.numel() for _, idx, _ in neighbours])):
            scores = weighted_knn_scores(sims, found.reshape(idx.shape).to(sims.device), num_classes,
                                         self.config.eval.sigma)
            c1, c5 = correct_at(scores, y, (1, min(5, num_classes)))
            counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(y)]
        return torch.tensor(counts)

    def _fresh_index(self) -> torch.Tensor:
        """(N, D) unit features of every train image in index order, on every worker:
        each embeds its share, then all of them gather the whole."""
        mine = [features for _, features in self._clean_features()]
        mine = torch.cat(mine) if mine else torch.empty(0, self.config.model.dim, device=self.device)
        shares = dist.all_gather_rows(mine, [len(range(r, self.n, self.world)) for r in range(self.world)])
        index = torch.empty(self.n, mine.shape[1], device=self.device)
        for r, share in enumerate(shares):
            index[r::self.world] = share.to(self.device)  # worker r embedded rows r, r + W, ...
        return index

    def _loss(self, f, step, logits, log_z_batch: float):
        c = self.config.loss
        if c.kind == "softmax":
            return softmax_loss(f, step.positives, c.temperature,
                                lambda q: self.feed.partition_sums(q, c.temperature))
        if c.kind == "infonce":
            return infonce_loss(*logits, accidental_hits(step.indices, step.negative_indices))
        if self.z.log_z is None or self.z.mode == "ema":
            self.z.update(log_z_batch)
        return nce_loss(*logits, self.z.log_z, self.n)

    def train_epoch(self) -> dict:
        c = self.config
        steps = min(self.length.steps_per_epoch, self.length.steps - self.step)  # all batches, or the steps left
        sampled = c.loss.kind in ("nce", "infonce")    # scored against K shared negatives
        nce = c.loss.kind == "nce"                      # needs Z
        rtt_sum = wait_sum = 0.0
        loss_sum = torch.zeros((), device=self.device)  # on the device: read back only when logged
        logged = (0, 0.0, 0.0)  # (steps, loss sum, seconds) at the last progress line
        start = time.perf_counter()
        # islice, not break: BankFeed sends the last step's update when its batches end.
        for b, step in enumerate(self.feed.steps(itertools.islice(self.input.epoch_batches(self.epoch), steps))):
            lr = lr_at_step(c.train.lr, self.step, self.length, c.train.schedule, c.train.milestones)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = augment(step.images.to(self.device, non_blocking=True).float().div_(255), c.augment)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                f = self.model(x).float()
            logits = sampled_logits(f, step.positives, step.negatives, c.loss.temperature) if sampled else None
            z_batch = math.exp(float(batch_log_z(*logits, self.n))) if nce else 0.0
            # Sync point, the step's one collective: whether any worker's features are
            # non-finite (they must not reach the bank), and NCE's Z, agreed as the mean
            # of the workers' estimates in linear space (0 for InfoNCE and the softmax,
            # which need no Z). With finite features and bank rows the loss is finite
            # (logits lie in [-1/tau, 1/tau]).
            finite_workers, z_sum = dist.all_reduce_sum([float(torch.isfinite(f).all()), z_batch])
            if finite_workers != self.world:
                raise StopTraining(f"the features became non-finite at epoch {self.epoch + 1}, step {self.step}; "
                                   "lower train.lr or raise loss.temperature")
            loss = self._loss(f, step, logits, math.log(z_sum / self.world) if nce else 0.0)
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
                logged = self._log_progress(b + 1, steps, time.perf_counter() - start, float(loss_sum), lr, rtt_sum,
                                            wait_sum, logged)
        seconds = time.perf_counter() - start
        return {"loss": float(loss_sum) / steps, "epoch_seconds": seconds,
                "images_per_sec": steps * c.train.batch_size / seconds,
                "bank_rtt_ms": 1e3 * rtt_sum / steps, "bank_wait_ms": 1e3 * wait_sum / steps}

    def _log_progress(self, done: int, steps: int, elapsed: float, loss_sum: float, lr: float, rtt_sum: float,
                      wait_sum: float, logged: tuple[int, float, float]) -> tuple[int, float, float]:
        """One progress line (means over the epoch so far), and one `step_log` entry
        (means since the previous line); returns the new `logged` mark."""
        c = self.config.train
        per_step = elapsed / done
        remaining = (self.length.steps - self.step) * per_step
        self._log(f"epoch {self.epoch + 1}/{self.epochs} step {done}/{steps} | "
                  f"{c.batch_size / per_step:,.0f} img/s | loss {loss_sum / done:.4f} | lr {lr:.4f} | "
                  f"bank rtt {1e3 * rtt_sum / done:.1f} ms (waited {1e3 * wait_sum / done:.1f} ms) | "
                  f"ETA {_duration(remaining)}")
        window = done - logged[0]
        self.step_log.append({"step": self.step, "loss": (loss_sum - logged[1]) / window, "lr": lr,
                              "images_per_sec": window * c.batch_size / (elapsed - logged[2]),
                              "bank_rtt_ms": 1e3 * rtt_sum / done})
        return done, loss_sum, elapsed

    def run(self) -> dict:
        start = time.perf_counter()
        try:
            return self._run()
        except StopTraining as error:
            # Every worker raises this at the same point (the condition is all-reduced or
            # broadcast), so returning here ends the run cleanly.
            self._log(f"stopped: {error}")
            return {"history": self.history, "step_log": self.step_log, "train_seconds": time.perf_counter() - start,
                    "steps": self.step, "bank_outages": self.bank_outages(), "error": str(error)}
        finally:
            self.feed.close()
            self.client.close()

    def _untrained(self) -> None:
        """Epoch 0 of the history: the untrained encoder's kNN, the floor that training
        must stay above (a run below it is warned about, every evaluated epoch). From the
        warm-started bank (its rows are then exactly those clean features), else fresh;
        a streamed dataset without a warm start has no such floor (fresh features would
        hold N x D on every worker)."""
        c = self.config
        if c.bank.warm_start:
            self.fill_bank("warm start")
        elif streamed(c):
            self._log("untrained encoder: not evaluated (a streamed dataset without bank.warm_start; the kNN "
                      "floor that runs are warned against needs the warm start)")
            return
        top1, top5, seconds = self.evaluate("bank" if c.bank.warm_start else "fresh")
        self.history.append({"epoch": 0, "step": 0, "loss": float("nan"), "knn_top1": top1, "knn_top5": top5,
                             "images_per_sec": 0.0, "epoch_seconds": 0.0, "bank_rtt_ms": 0.0, "bank_wait_ms": 0.0,
                             "lr": c.train.lr, "eval_seconds": seconds, "refresh_seconds": float("nan")})
        self._log(f"untrained encoder: kNN top-1 {percent(top1)} top-5 {percent(top5)} ({seconds:.1f} s)")

    def _run(self) -> dict:
        import ray.train
        from ray.train import Checkpoint

        c = self.config
        saved = ray.train.get_checkpoint()
        if saved is not None:
            self.restore(saved)
        else:
            self._untrained()
        if self.rank == 0 and self.starts:
            start = ray.get(ray.get_actor(self.starts).started.remote(self.epoch))
            if start > 1:
                self._log(f"Ray Train restarted the workers (restart {start - 1} of at most "
                          f"train.max_failures={c.train.max_failures}); going on from epoch {self.epoch}")
        untrained = next((h["knn_top1"] for h in self.history if h["epoch"] == 0), None)
        # Counted from the steps left, not from length.epochs: a run resumed from a
        # checkpoint taken where an earlier train.steps cut an epoch short goes on from
        # that step.
        self.epochs = self.epoch + math.ceil(max(0, self.length.steps - self.step) / self.length.steps_per_epoch)
        train_start = time.perf_counter()
        while self.step < self.length.steps:
            metrics = self.train_epoch()
            self.epoch += 1
            last = self.step >= self.length.steps
            refresh_s = float("nan")
            if c.train.refresh_bank_every and self.epoch % c.train.refresh_bank_every == 0:
                refresh_s = self.fill_bank(f"refreshed (train.refresh_bank_every={c.train.refresh_bank_every})")
            top1 = top5 = eval_s = float("nan")
            if last or self.epoch % c.eval.every == 0:
                top1, top5, eval_s = self.evaluate(c.eval.source)
            metrics.update(epoch=self.epoch, step=self.step, knn_top1=top1, knn_top5=top5, eval_seconds=eval_s,
                           refresh_seconds=refresh_s,
                           lr=lr_at_step(c.train.lr, self.step, self.length, c.train.schedule, c.train.milestones))
            self.history.append(metrics)
            self._log(f"epoch {self.epoch}/{self.epochs} done in {metrics['epoch_seconds']:.1f}s | "
                      f"loss {metrics['loss']:.4f} | {metrics['images_per_sec']:,.0f} img/s | "
                      f"kNN top-1 {percent(top1)} top-5 {percent(top5)}"
                      + ("" if math.isnan(eval_s) else f" (eval.source={c.eval.source}, {eval_s:.1f} s)"))
            warning = below_untrained(metrics, untrained)
            if warning:
                self._log(f"WARNING: {warning}")
            # The bank snapshot and the model checkpoint describe the same step.
            dist.barrier()
            outages = self.bank_outages()  # so that a restart from this checkpoint still counts them
            tag = f"epoch-{self.epoch:04d}-step-{self.step}"
            folder = None
            if self.rank == 0:
                self.client.snapshot(tag)
                folder = self._checkpoint_dir(tag, outages)
            ray.train.report({k: v for k, v in metrics.items()} | {"bank_snapshot": tag},
                             checkpoint=Checkpoint.from_directory(folder) if folder else None,
                             checkpoint_dir_name=f"epoch-{self.epoch:04d}")
        return {"history": self.history, "step_log": self.step_log, "train_seconds": time.perf_counter() - train_start,
                "steps": self.step, "bank_outages": self.bank_outages()}


def _dataset_words(fingerprint: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in fingerprint.items())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def show_bank_client_lines() -> None:
    """The bank client's own lines (a shard unreachable, and reachable again) on this
    worker's stderr, which Ray forwards to the driver's console: without a handler,
    Python would print the WARNING bare and drop the INFO."""
    logger = logging.getLogger("bank_server.client")
    if not any(getattr(handler, "instdisc", False) for handler in logger.handlers):  # once per process
        handler = logging.StreamHandler(sys.stderr)
        handler.instdisc = True
        handler.setFormatter(logging.Formatter(f"[instdisc rank {dist.rank()}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not twice, when Ray Train configures the root logger


def train_func(loop_config: dict) -> dict:
    """Ray Train's per-worker entry point. The bank token is read here, on the worker's
    node, from where the launch said it is: the loop config is in Ray's records."""
    config = Config.from_dict(loop_config["config"])
    show_bank_client_lines()
    token = read_token(config.bank.token_file, loop_config.get("token_env"))
    worker = Worker(config, loop_config["addresses"], token, loop_config.get("bank_actors", ()),
                    loop_config.get("starts"))
    return worker.run()
