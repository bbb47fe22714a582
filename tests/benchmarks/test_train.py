"""`instdisc bench train` runs both banks on real images and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest


def test_bench_train_compares_remote_and_inprocess_banks(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "bench", "train", "--steps", "6", "--warmup", "2",
                           "--batch", "32", "--negatives", "256", "--width", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio (a)/(b)" in done.stdout
    assert "dropped" not in done.stderr  # the last step's update went out: the remote loop ended cleanly
    result = json.loads(out.read_text())
    assert result["remote_images_per_sec"] > 0 and result["inprocess_images_per_sec"] > 0
    assert abs(result["ratio"] - result["remote_images_per_sec"] / result["inprocess_images_per_sec"]) < 1e-9
    assert result["rounds"] == 4  # the 6 steps taken in turns, 2 + 2 + 1 + 1 per bank


def test_the_banks_take_turns_and_share_the_steps():
    from benchmarks.train_loops import images_per_sec

    calls = []

    class Loop:
        def __init__(self, name):
            self.name = name

        def warm_up(self, steps):
            calls.append((self.name, "warm-up", steps))

        def run(self, steps):
            calls.append((self.name, "run", steps))
            return steps * (1.0 if self.name == "a" else 2.0)  # b takes twice as long a step

    rates = images_per_sec({"a": Loop("a"), "b": Loop("b")}, steps=10, warmup=3, rounds=4, batch=8)
    assert calls == [("a", "warm-up", 3), ("b", "warm-up", 3), ("a", "run", 3), ("b", "run", 3), ("b", "run", 3),
                     ("a", "run", 3), ("a", "run", 2), ("b", "run", 2), ("b", "run", 2), ("a", "run", 2)]
    assert rates == {"a": 8.0, "b": 4.0}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a core for the bank and one for training")
def test_bench_train_can_give_the_bank_cores_of_its_own(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, "-m", "trainer.cli", "bench", "train", "--steps", "4", "--warmup", "1",
                           "--batch", "32", "--negatives", "256", "--width", "8", "--bank-cores", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cores = sorted(os.sched_getaffinity(0))
    result = json.loads(out.read_text())
    # Read back from the processes' threads by the command, not echoed from its arguments.
    assert (result["bank_cores"], result["bank_cpus"], result["train_cpus"]) == (1, cores[:1], cores[1:])
    assert result["torch_threads"] == len(cores) - 1
    assert f"the bank on core(s) {cores[:1]}; training on core(s) {cores[1:]}" in done.stdout


def test_the_bank_cores_are_the_first_and_training_keeps_at_least_one():
    from benchmarks.train import split_cores

    assert split_cores([0, 1, 2, 3], 0) == (set(), set())
    assert split_cores([0, 1, 2, 3], 1) == ({0}, {1, 2, 3})
    assert split_cores([2, 5, 7], 2) == ({2, 5}, {7})
    for bad in (-1, 3):
        with pytest.raises(SystemExit, match=r"--bank-cores must be in \[0, 2\]"):
            split_cores([2, 5, 7], bad)
