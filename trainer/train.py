"""The per-worker training loop: data -> model -> bank -> steps -> eval -> report.

Runs inside Ray Train (`TorchTrainer`) on every worker; `trainer.launch` builds the
trainer. `Worker.train_step` is one step, top to bottom. Each worker reaches the bank
through a `BankFeed`, which owns the step schedule (its docstring states it): each
step's bank round trip runs while the step computes. A step makes one collective,
marked "sync point" below; DDP's gradient all-reduce inside ``backward()`` is the other.

Evaluation reads and never writes the bank (`trainer.evaluate`). Rewriting the bank
from clean images is a training step of its own (``train.refresh_bank_every``,
`trainer.features.fill_bank`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from contextlib import nullcontext

import torch

from bank_server.client import BankClient
from bank_server.ray_bank import read_token, resolver
from trainer import distributed as dist
from trainer import resume
from trainer.augment import augment
from trainer.bank_feed import BankFeed, BankStep
from trainer.cadence import Cadence, Due
from trainer.config import Config
from trainer.console import show_worker_lines
from trainer.distributed import StopTraining
from trainer.evaluate import evaluate_run
from trainer.features import fill_bank
from trainer.images import BadImage
from trainer.input import open_input, streamed
from trainer.live_tensorboard import EventSender
from trainer.losses import (
    PartitionEstimate,
    accidental_hits,
    batch_log_z,
    infonce_loss,
    nce_loss,
    sampled_logits,
    softmax_loss,
)
from trainer.meter import Meter
from trainer.models import Encoder
from trainer.outputs import below_untrained, percent
from trainer.schedule import lr_at_step, run_length

log = logging.getLogger(__name__)


class LoopStarts:
    """Counts the train loop's starts in one launch, as a named Ray actor that the launch
    creates and reads at the end: Ray Train restarts every worker when one fails
    (``train.max_failures``), and a start from a checkpoint alone cannot tell such a
    restart from the resume of an earlier launch."""

    def __init__(self):
        self._steps: list[int] = []

    def started(self, step: int) -> int:
        """Rank 0 starts the loop at `step` (its checkpoint's; 0 when none): which start this is."""
        self._steps.append(step)
        return len(self._steps)

    def restarts(self) -> list[int]:
        """The checkpoint step each restart went on from (0: none yet), oldest first."""
        return self._steps[1:]


def build_encoder(config: Config, channels: int, mean, std) -> Encoder:
    m = config.model
    return Encoder(m.arch, channels, m.dim, m.width, m.cifar_stem, mean=mean, std=std)


class Worker:
    """One worker's state and its epoch loop (`run`)."""

    def __init__(
        self,
        config: Config,
        addresses: list[str],
        token: str | None,
        bank_actors: list[str] = (),
        starts: str | None = None,
        event_writer: str | None = None,
    ):
        import ray.train.torch

        self.config = c = config
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(c.train.cpus_per_worker)))
        torch.manual_seed(c.train.seed + self.rank)

        # 1. data: in memory, or this worker's share streamed (trainer.input)
        self.input = open_input(c, self.rank, self.world, on_gpu=self.device.type == "cuda")
        self.n = self.input.rows
        self.length = run_length(self.n, c.train.batch_size, c.train.epochs, c.train.steps)
        if self.input.batches_per_epoch() != self.length.steps_per_epoch:  # launch printed it by the same rule
            raise AssertionError(
                f"{self.input.batches_per_epoch()} batches per epoch, expected {self.length.steps_per_epoch}"
            )

        # 2. model
        encoder = build_encoder(c, self.input.channels, *self.input.stats())
        encoder.check_input(self.input.side)
        self.model = ray.train.torch.prepare_model(encoder)
        self.encoder = self.model.module if hasattr(self.model, "module") else self.model  # bare, for clean images
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=c.train.lr, momentum=c.train.momentum, weight_decay=c.train.weight_decay
        )
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

        # 3. bank (shards that are Ray actors are found again by name if they move)
        resolve = None
        if bank_actors:
            resolve = resolver(list(bank_actors))
            # Where they serve now: a shard that restarted since the launch (before a Ray
            # Train retry, say) serves on another port than the launch recorded.
            addresses = [resolve(s, c.bank.timeout) for s in range(len(bank_actors))]
        self.client = BankClient(addresses, token=token, timeout=c.bank.timeout, tls_ca=c.bank.tls_ca, resolve=resolve)
        if (self.client.rows, self.client.dim) != (self.n, c.model.dim):
            raise ValueError(
                f"the bank at {addresses} holds {self.client.rows} rows x {self.client.dim} dims, but "
                f"the dataset has {self.n} training images and model.dim={c.model.dim}"
            )
        negatives = c.loss.negatives if c.loss.kind in ("nce", "infonce") else 0
        # A collective: every worker makes every node's group. By Ray's node id: Ray
        # Train's node rank counts IP addresses, which nodes may share.
        node = dist.node_group(ray.get_runtime_context().get_node_id()) if c.bank.one_step_per_node else None
        self.feed = BankFeed(self.client, negatives, c.bank.momentum, self.device, node)
        self.z = PartitionEstimate(c.loss.z_mode, c.loss.z_momentum)  # NCE's Z

        # 4. where training stands: epochs completed, steps of the run and of the epoch in
        # progress. history: one row per pause (epoch 0: the untrained encoder), which
        # travels in the checkpoint.
        self.epoch, self.step, self.epoch_step, self.history = 0, 0, 0, []
        self.meter = Meter(c.train.batch_size, c.train.log_every)
        self.epochs = self.length.epochs  # the run's last epoch; _run counts it again after a resume
        # Bank outages that workers saw before this start (a checkpoint carries them); this
        # start's are asked of every worker's client when a checkpoint or the end needs them.
        self.earlier_outages: list[dict] = []
        self.starts = starts
        self.events = EventSender(event_writer if self.rank == 0 else None)  # the run's TensorBoard files

    # -- one step -----------------------------------------------------------------

    def train_step(self, step: BankStep) -> torch.Tensor:
        """One optimizer step on one batch and its bank rows; returns the loss (detached)."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        x = augment(step.images.to(self.device, non_blocking=True).float().div_(255), c.augment)
        with self.autocast:
            f = self.model(x).float()  # (B, D) unit features
        # (B,) positive and (B, K) negative logits; the full softmax asks the bank instead.
        sampled = c.loss.kind != "softmax"
        logits = sampled_logits(f, step.positives, step.negatives, c.loss.temperature) if sampled else None
        z_batch = math.exp(float(batch_log_z(*logits, self.n))) if c.loss.kind == "nce" else 0.0
        # Sync point, the step's one collective: whether any worker's features are
        # non-finite (they must not reach the bank), and NCE's Z, agreed as the mean of the
        # workers' estimates in linear space. With finite features and bank rows the loss
        # is finite (logits lie in [-1/tau, 1/tau]).
        finite_workers, z_sum = dist.all_reduce_sum([float(torch.isfinite(f).all()), z_batch])
        if finite_workers != self.world:
            raise StopTraining(
                f"the features became non-finite at epoch {self.epoch + 1}, step {self.step}; "
                "lower train.lr or raise loss.temperature"
            )
        if c.loss.kind == "nce":
            self.z.update(math.log(z_sum / self.world))
        loss = self.loss(f, step, logits)
        # To the host now, while only the forward (finished at the sync point) is behind
        # it; after backward() the copy would wait for the whole step.
        self.feed.push(step.indices, f)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return loss.detach()

    def loss(self, f: torch.Tensor, step: BankStep, logits) -> torch.Tensor:
        c = self.config.loss
        if c.kind == "softmax":
            return softmax_loss(f, step.positives, c.temperature, lambda q: self.feed.partition_sums(q, c.temperature))
        if c.kind == "infonce":
            return infonce_loss(*logits, accidental_hits(step.indices, step.negative_indices))
        return nce_loss(*logits, self.z.log_z, self.n)

    def lr_at(self, step: int) -> float:
        t = self.config.train
        return lr_at_step(t.lr, step, self.length, t.schedule, t.milestones)

    # -- training between pauses -------------------------------------------------

    def train_until(self, batches, stop: int) -> None:
        """Train on `batches` (the epoch's, from where it stands) up to global step `stop`."""
        self.meter.start_stretch(self.device)
        # islice, not break: BankFeed sends the last step's update when its batches end, so
        # the bank holds every update of these steps when training pauses.
        for step in self.feed.steps(itertools.islice(batches, stop - self.step)):
            loss = self.train_step(step)
            self.epoch_step += 1
            self.meter.add(loss, step.round_trip_s, step.waited_s)
            if self.meter.line_due(self.step):
                line, figures = self.meter.progress(self.step, self.lr_at(self.step - 1), self.length.steps - self.step)
                log.info(f"epoch {self.epoch + 1}/{self.epochs} step {self.step}/{self.length.steps} | {line}")
                self.events.progress(figures)
        self.meter.end_stretch()

    def refresh_bank(self, why: str) -> float:
        """`fill_bank` by the current encoder; returns the seconds it took. Before training
        this is the warm start: the first positives and negatives are features of the same
        network. Every train.refresh_bank_every steps it is lemniscate's
        `recompute_memory`, a part of training: the following steps read those rows."""
        seconds = fill_bank(self.encoder, self.input, self.feed, self.device)
        log.info(f"bank {why}: {self.n} rows in {seconds:.1f} s")
        return seconds

    def evaluate(self, source: str) -> tuple[float, float, float]:
        return evaluate_run(self.encoder, self.input, self.feed, self.config, self.device, source)

    # -- state ----------------------------------------------------------------------

    def state(self, outages: list[dict]) -> dict:
        """What a checkpoint keeps of this worker (`trainer.checkpoint` lists the fields)."""
        return {
            "model": self.encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "encoder": self.encoder.spec(),
            "image_size": int(self.input.side),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_step": self.epoch_step,
            "history": self.history,
            "log_z": self.z.log_z,
            "config": self.config.to_dict(),
            "git_sha": os.environ.get("INSTDISC_GIT_SHA", ""),
            "bank_outages": outages,
            "dataset": self.input.fingerprint(),
        }

    def load(self, state: dict) -> None:
        self.encoder.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.epoch_step = state.get("epoch_step", 0)  # older checkpoints: taken at epoch ends
        then, now = state["config"]["train"], self.config.train
        if self.epoch_step and (then["batch_size"], then["workers"]) != (now.batch_size, now.workers):
            # The epoch's batches are another split of it: going on would repeat some rows and miss others.
            log.info(
                f"the checkpoint was taken {self.epoch_step} steps into epoch {self.epoch + 1} with "
                f"train.batch_size={then['batch_size']} and train.workers={then['workers']}; with this run's "
                f"{now.batch_size} and {now.workers} that epoch starts over"
            )
            self.epoch_step = 0
        self.earlier_outages = state.get("bank_outages", [])
        self.z.log_z = state["log_z"]

    def bank_outages(self) -> list[dict]:
        """Every bank outage a worker's client saw in this run, with its rank: those before
        this start (from the checkpoint) and every worker's since. A collective: every
        worker calls it at the same point. Those that a failed worker saw after its last
        checkpoint are lost with it."""
        mine = [outage | {"rank": self.rank} for outage in self.client.outages()]
        return self.earlier_outages + [o for share in dist.all_gather_object(mine) for o in share]

    def bad_images_skipped(self) -> int:
        """How many images data.on_bad_image=skip left out in this start, each counted
        once however many workers met it. A collective, like `bank_outages`."""
        return len(set().union(*dist.all_gather_object(self.input.bad.skipped)))

    # -- the run --------------------------------------------------------------------

    def run(self) -> dict:
        start = time.perf_counter()
        try:
            return self._run()
        except (StopTraining, resume.CannotResume) as error:
            # Every worker raises this at the same point (the condition is all-reduced or
            # broadcast), so returning here ends the run cleanly.
            log.info(f"stopped: {error}")
            return self.outcome(time.perf_counter() - start) | {"error": str(error)}
        finally:
            self.events.finish()
            self.feed.close()
            self.client.close()

    def _untrained(self) -> None:
        """Epoch 0 of the history: the untrained encoder's kNN, the floor that training
        must stay above (a run below it is warned about, every evaluated epoch). From the
        warm-started bank (its rows are then exactly those clean features), else fresh;
        a streamed dataset without a warm start has no such floor (fresh features would
        hold N x D on every worker)."""
        c = self.config
        fill_s = float("nan")
        if c.bank.warm_start:
            fill_s = self.refresh_bank("warm start")
        if self.input.unevaluated:  # the launch's `data:` line said why
            return
        if not c.bank.warm_start and streamed(c):
            log.info(
                "untrained encoder: not evaluated (a streamed dataset without bank.warm_start; the kNN "
                "floor that runs are warned against needs the warm start)"
            )
            return
        top1, top5, seconds = self.evaluate("bank" if c.bank.warm_start else "fresh")
        self.meter.paused(seconds + (0.0 if math.isnan(fill_s) else fill_s))
        self.history.append(
            {
                "epoch": 0,
                "step": 0,
                "loss": float("nan"),
                "knn_top1": top1,
                "knn_top5": top5,
                "images_per_sec": 0.0,
                "seconds": 0.0,
                "bank_rtt_ms": 0.0,
                "bank_wait_ms": 0.0,
                "lr": c.train.lr,
                "eval_seconds": seconds,
                "refresh_seconds": fill_s,
            }
        )
        self.events.epoch(self.history[-1])
        log.info(f"untrained encoder: kNN top-1 {percent(top1)} top-5 {percent(top5)} ({seconds:.1f} s)")

    def _run(self) -> dict:
        import ray
        import ray.train

        c = self.config
        saved = ray.train.get_checkpoint()
        if saved is not None:
            with saved.as_directory() as folder:
                node_local = (c.bank.snapshot_dir or "").startswith("$")
                self.load(resume.restore(folder, self.client, self.input.fingerprint(), self.device, node_local))
            # An earlier attempt may have written points past this checkpoint: they go.
            self.events.start(self.step + 1)
        else:
            self.events.start(0)
            self._untrained()
        if self.rank == 0 and self.starts:
            start = ray.get(ray.get_actor(self.starts).started.remote(self.step))
            if start > 1:
                log.info(
                    f"Ray Train restarted the workers (restart {start - 1} of at most "
                    f"train.max_failures={c.train.max_failures}); going on from step {self.step}"
                )
        untrained = next((h["knn_top1"] for h in self.history if h["step"] == 0), None)
        per_epoch = self.length.steps_per_epoch
        # Counted from the steps left, not from length.epochs: a run resumed from a
        # checkpoint taken where an earlier train.steps cut an epoch short goes on from
        # that step.
        self.epochs = self.epoch + math.ceil(max(0, self.length.steps - self.step + self.epoch_step) / per_epoch)
        cadence = Cadence(c, self.length, self.step, evaluates=not self.input.unevaluated)
        if self.step == 0 and self.history:  # the untrained encoder's evaluation: its cost is known
            cadence.done(0, Due(refresh=False, evaluate=True, checkpoint=False), self.history[-1]["eval_seconds"])
        train_start = time.perf_counter()
        batches = None
        while self.step < self.length.steps:
            if batches is None:  # the epoch starts, or goes on where its checkpoint was taken
                batches = iter(self.input.epoch_batches(self.epoch, skip=self.epoch_step))
            epoch_end = self.step + per_epoch - self.epoch_step
            self.train_until(batches, cadence.next_stop(self.step, epoch_end))
            pause_start = time.perf_counter()
            epoch_ended = self.step == epoch_end  # not at the end of a run that train.steps cuts short
            if epoch_ended:
                self.epoch, self.epoch_step, batches = self.epoch + 1, 0, None
            due = cadence.due(self.step, epoch_ended)
            refresh_s = top1 = top5 = eval_s = float("nan")
            if due.refresh:
                refresh_s = self.refresh_bank(f"refreshed (train.refresh_bank_every={cadence.refresh_every})")
            if due.evaluate:
                top1, top5, eval_s = self.evaluate(c.eval.source)
            cadence.done(self.step, due, eval_s)
            if epoch_ended or due.refresh or due.evaluate or due.checkpoint:
                self._record(self.meter.row(), top1, top5, eval_s, refresh_s, untrained, epoch_ended)
            if due.checkpoint:
                self.checkpoint()
            cadence.agree(self.step, self.meter.seconds_per_step())
            self.meter.paused(time.perf_counter() - pause_start)  # the ETA counts this pause
        return self.outcome(time.perf_counter() - train_start)

    def _record(self, metrics: dict, top1, top5, eval_s, refresh_s, untrained, epoch_ended: bool) -> None:
        """A row of the history (an epoch's end, a refresh, an evaluation or a checkpoint), and a line for an
        evaluation."""
        metrics.update(
            epoch=round(self.epoch + self.epoch_step / self.length.steps_per_epoch, 3),
            step=self.step,
            knn_top1=top1,
            knn_top5=top5,
            eval_seconds=eval_s,
            refresh_seconds=refresh_s,
            lr=self.lr_at(self.step),
        )
        self.history.append(metrics)
        self.events.epoch(metrics)
        if not math.isnan(eval_s):  # the progress lines say the rest
            where = f"epoch {self.epoch}/{self.epochs} done" if epoch_ended else f"step {self.step}/{self.length.steps}"
            log.info(
                f"{where} | loss {metrics['loss']:.4f} | kNN top-1 {percent(top1)} top-5 {percent(top5)} "
                f"({eval_s:.1f} s)"
            )
        warning = below_untrained(metrics, untrained)
        if warning:
            log.warning(warning)

    def checkpoint(self) -> None:
        """The model checkpoint and the bank snapshot of this step, reported to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        dist.barrier()  # every worker has finished the step: the snapshot holds its updates
        folder = resume.save(self.client, self.state(self.bank_outages()))  # outages: a restart still counts them
        ray.train.report(
            {"step": self.step, "bank_snapshot": resume.snapshot_tag(self.epoch, self.step)},
            checkpoint=Checkpoint.from_directory(folder) if folder else None,
            checkpoint_dir_name=resume.checkpoint_name(self.epoch, self.step),
        )

    def outcome(self, train_seconds: float) -> dict:
        """What the run returns to the launch (a collective: every worker calls it)."""
        return {
            "history": self.history,
            "train_seconds": train_seconds,
            # Of this start: the warm start, refreshes, evaluations and checkpoints.
            "paused_seconds": self.meter.paused_s,
            "steps": self.step,
            "bank_outages": self.bank_outages(),
            "bad_images_skipped": self.bad_images_skipped(),
            "evaluation_skipped": self.input.unevaluated,
        }


def train_func(loop_config: dict) -> dict:
    """Ray Train's per-worker entry point. The bank token is read here, on the worker's
    node, from where the launch said it is: the loop config is in Ray's records."""
    config = Config.from_dict(loop_config["config"])
    show_worker_lines(dist.rank())
    token = read_token(config.bank.token_file, loop_config.get("token_env"))
    try:
        worker = Worker(
            config,
            loop_config["addresses"],
            token,
            loop_config.get("bank_actors", ()),
            loop_config.get("starts"),
            loop_config.get("event_writer"),
        )
    except BadImage as error:
        # From the normalisation statistics: every worker decodes the same first images,
        # so every one stops here alike, and returning spares Ray's retry.
        log.info(f"stopped: {error}")
        stopped = {"history": [], "train_seconds": 0.0, "steps": 0, "bank_outages": []}
        return stopped | {"error": str(error)}
    return worker.run()
