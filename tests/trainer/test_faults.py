"""Faults during training, in a real `instdisc train` run that this test starts: a Ray
shard actor's process SIGKILLed mid-epoch, then a Ray Train worker's process SIGKILLed
after a checkpoint taken mid-epoch. Ray restarts the shard (it recovers its snapshot
and log), Ray Train restarts the workers from the checkpoint (the bank restores the
matching snapshot) at its step, the run finishes and summary.json records both.
TensorBoard's reader finds the run's points while it trains, and each step once at the
end. (An external shard killed and restarted: tests/bank_server/test_ray_cluster.py.)

The run carries a bank token (INSTDISC_BANK_TOKEN) and leaves it in no file under the
output folder (Ray Train's storage and the checkpoints included) nor in the console.
Only processes this test started are killed: Ray's worker processes that descend from
its own `instdisc train`.
"""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import wait_until

# Small and quick, but long enough (64 steps an epoch) to be hit in the middle of one.
SMALL = [
    "data.subset=2048",
    "data.test_subset=500",
    "train.batch_size=32",
    "train.workers=2",
    "bank.shards=2",
    "train.log_every=4",
    "loss.negatives=256",
    "train.refresh_bank_every=0",
    "eval.k=50",
]
RUN_S = 420  # a run's bound, Ray's start and a restart included, on 2 busy cores


class Run:
    """``instdisc train`` in a child process, its stdout and stderr in one file."""

    def __init__(self, output: Path, overrides: list[str], env: dict | None = None, name: str = "faults"):
        self.output, self.name = output, name
        self.log = output.parent / f"{output.name}.log"
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", "--output-dir", str(output), "--name", name, *SMALL, *overrides],
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env=env or os.environ.copy(),
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> None:
        found = wait_until(lambda: re.search(pattern, self.text()) or self.proc.poll() is not None, timeout, 0.2)
        assert found and re.search(pattern, self.text()), f"no {pattern!r} in time:\n{self.text()[-3000:]}"

    def finish(self) -> str:
        self.proc.wait(RUN_S)
        logs = self.text()
        assert self.proc.returncode == 0, logs[-5000:]
        return logs

    def summary(self) -> dict:
        return json.loads((self.output / "summary.json").read_text())

    def ray_processes(self, title: str) -> list[int]:
        """Pids of the processes descended from this run whose title starts with `title`
        (Ray names an actor's process ``ray::<Class>``)."""
        return [pid for pid in descendants(self.proc.pid) if command_line(pid).startswith(title)]

    def stop(self) -> None:
        """End the run if it is still going (a failed test): SIGTERM lets it stop its Ray,
        then SIGKILL for it and whatever of its descendants is left."""
        if self.proc.poll() is None:
            left = descendants(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            for pid in left:
                kill(pid)
        self._file.close()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill(pid: int) -> None:
    """SIGKILL `pid` (a process this test started, or one of its run's) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid), timeout=30)


def _state(pid: int) -> str:
    try:
        return "zombie" if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z") else "alive"
    except OSError:
        return "zombie"


def assert_token_nowhere(token: str, output: Path, logs: str) -> None:
    """Not in any file under the run's output folder (its checkpoint, Ray Train's
    storage `<output>/ray` with the checkpoints it keeps, the bank's snapshots), nor
    on its console."""
    needle = token.encode()
    files = [path for path in output.rglob("*") if path.is_file()]
    assert any(path.name == "state.pt" for path in files)  # the checkpoints were searched too
    assert any("ray" == path.relative_to(output).parts[0] for path in files)
    holding = [str(path) for path in files if needle in path.read_bytes()]
    assert not holding, holding
    assert token not in logs


def scalar_steps(output: Path, tag: str) -> list[int]:
    """The steps of `tag`'s points in the run's TensorBoard events, by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def said_outage_of(logs: str, shard: int) -> bool:
    """The workers' consoles said that the shard went, and that it came back."""
    return f"bank shard {shard} at" in logs and " unreachable" in logs and "reachable again" in logs


def assert_outages_of(summary: dict, shard: int) -> None:
    """Each worker that saw shard `shard` go counts it once, and it came back."""
    details = summary["bank_outage_details"]
    assert 1 <= summary["bank_outages"] == len(details) <= 2, details
    assert sorted({o["rank"] for o in details}) == sorted(o["rank"] for o in details)  # once per worker
    assert all(
        o["shard"] == shard and o["code"] == "UNAVAILABLE" and not o["ongoing"] and o["retries"] >= 1 for o in details
    ), details


def test_a_killed_shard_actor_and_a_killed_train_worker(tmp_path):
    token = secrets.token_hex(16)
    run = Run(
        tmp_path / "out",
        # A checkpoint at step 80, in the middle of the second epoch of 64 (and at the end).
        ["train.epochs=2", "train.max_failures=1", "train.checkpoint_every=80", "eval.every=64"],
        env={**os.environ, "INSTDISC_BANK_TOKEN": token},
    )
    try:
        run.wait_for(r"epoch 1/2 step \d+/128", RUN_S)
        shards = run.ray_processes("ray::BankShardActor")
        assert len(shards) == 2, shards
        kill(shards[1])
        # After the checkpoint of step 80, once Ray Train's controller has it on record
        # (it writes this file then): Ray Train goes on from it.
        registered = run.output / "ray" / run.name / "checkpoint_manager_snapshot.json"
        assert wait_until(lambda: registered.exists() and "step-00000080" in registered.read_text(), timeout=RUN_S)
        run.wait_for(r"epoch 2/2 step (8[4-9]|9\d|1[01]\d)/128", RUN_S)
        # TensorBoard's own reader sees the run so far, while it trains.
        assert wait_until(lambda: 0 in scalar_steps(run.output, "knn/top1"), timeout=30)
        assert scalar_steps(run.output, "train/loss")[:2] == [4, 8]
        workers = run.ray_processes("ray::RayTrainWorker")
        assert len(workers) == 2, workers
        # Rank 1 (rank 0 prints the progress lines): in one try, rank 0 killed a second
        # after the epoch's report left Ray Train restarting from no checkpoint at all.
        rank0 = int(re.findall(r"RayTrainWorker pid=(\d+)\S* \[instdisc\] epoch \d/2 step", run.text())[-1])
        assert rank0 in workers, (rank0, workers)
        kill(next(pid for pid in workers if pid != rank0))
        logs = run.finish()
    finally:
        run.stop()
    summary = run.summary()
    # From the checkpoint of step 80: mid-epoch, at its step.
    assert (summary["worker_restarts"], summary["worker_restart_steps"]) == (1, [80]), summary
    step = 80
    assert summary["epochs"] == 2 and summary["steps"] == 128 and 0 < summary["knn_top1"] <= 1
    # The shard's outage, seen in epoch 1, survives the workers' restart in the checkpoint.
    shard = summary["bank_outage_details"][0]["shard"] if summary["bank_outage_details"] else None
    assert shard is not None, logs[-5000:]
    assert_outages_of(summary, shard)
    assert said_outage_of(logs, shard), logs[-5000:]
    tag = f"epoch-000{step // 64}-step-{step}"
    assert f"resumed at epoch {step // 64}, step {step}, bank snapshot '{tag}'" in logs  # and its rows
    # The restart went on from that step: what the first attempt wrote after it gave way.
    assert scalar_steps(run.output, "train/loss") == list(range(4, 129, 4))
    assert scalar_steps(run.output, "knn/top1") == [0, 64, 128]
    assert_token_nowhere(token, run.output, logs)
