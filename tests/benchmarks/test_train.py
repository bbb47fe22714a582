"""`instdisc bench train` runs both banks on real images and writes its JSON."""

import json
import subprocess
import sys


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
