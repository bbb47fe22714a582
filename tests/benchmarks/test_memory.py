"""The memory sampler: real PSS of a child tree that holds known memory, and the roles
it gives Ray's processes (from a made-up process table)."""

import subprocess
import sys
import time

from benchmarks.memory import (BANK, OTHER, TRAIN_WORKER, MemorySampler, Peaks, descendants, pss_bytes, read_memory,
                               take_sample)

MB = 1_000_000
# Each holds `mb` MB, touched (bytes * n writes every page, so it is resident), says
# "ready" and waits for a line on stdin; the parent starts its child first and says
# "ready" when both hold theirs.
HOLDS = "import sys; block = b'x' * ({mb} * 1_000_000); print('ready', flush=True); sys.stdin.readline()"
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, '-c', {child!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
child.stdout.readline()
block = b'x' * ({mb} * 1_000_000)
print('ready', flush=True)
sys.stdin.readline()
child.communicate('\\n')
"""


def test_the_sampler_sees_a_tree_s_memory_and_its_peak_outlives_the_processes():
    code = PARENT.format(child=HOLDS.format(mb=150), mb=100)
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with MemorySampler(parent.pid, interval=0.05) as sampler:
            assert parent.stdout.readline() == "ready\n"  # both blocks are held now
            deadline = time.monotonic() + 10
            while sampler.snapshot().total < 250 * MB and time.monotonic() < deadline:
                time.sleep(0.05)
            parent.stdin.write("\n")
            parent.stdin.flush()
            parent.wait(10)
            time.sleep(0.2)  # samples of a tree that has gone: nothing to read, nothing lost
        peaks = sampler.peaks
    finally:
        parent.kill()
    assert sampler.errors == 0 and peaks.samples >= 3
    # Two interpreters (~10 MB each) on top of 250 MB of blocks, all "other" (no Ray titles).
    assert 250 * MB <= peaks.total < 330 * MB, peaks
    assert peaks.roles[OTHER] == peaks.total and peaks.roles[TRAIN_WORKER] == peaks.roles[BANK] == 0
    assert peaks.per_worker == 0
    assert len(sampler.timeline) == peaks.samples and max(t[-1] for t in sampler.timeline) == peaks.total
    seconds = [t[0] for t in sampler.timeline]
    assert seconds == sorted(seconds) and 0 <= seconds[0] < 1


def test_a_process_s_anonymous_memory_is_part_of_its_pss():
    holder = subprocess.Popen([sys.executable, "-c", HOLDS.format(mb=100)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        pss, anon = read_memory(holder.pid)
    finally:
        holder.communicate("\n", timeout=10)
    assert 100 * MB <= anon <= pss < 100 * MB + 50 * MB


def test_pss_of_a_process_that_is_gone_is_none():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert pss_bytes(int(done.stdout)) is None
    assert pss_bytes(1 << 30) is None and read_memory(1 << 30) is None


# root 1: the driver; 2: raylet; 3, 4: train workers, 5: a DataLoader worker of 3 (it
# keeps 3's title); 6: a bank shard and 7 a child of it; 8: an idle worker; 9: outside.
TABLE = {1: (0, "python -m trainer.cli train"), 2: (1, "raylet --node"), 3: (2, "ray::RayTrainWorker.run_train_fn"),
         4: (2, "ray::RayTrainWorker"), 5: (3, "ray::RayTrainWorker.run_train_fn"), 6: (2, "ray::BankShardActor"),
         7: (6, "sh -c true"), 8: (2, "ray::IDLE"), 9: (0, "ray::RayTrainWorker")}
PSS = {1: 100, 2: 10, 3: 300, 4: 310, 5: 50, 6: 1000, 7: 1, 8: 20, 9: 999}


def with_anon(pss: dict[int, int]):
    """A reader of (PSS, anonymous PSS) where a tenth of each process's PSS is anonymous."""
    return lambda pid: (pss[pid], pss[pid] // 10)


def test_roles_follow_the_nearest_titled_ancestor_and_children_count_with_their_worker():
    assert descendants(1, TABLE)[0] == 1 and set(descendants(1, TABLE)) == set(range(1, 9))
    sample = take_sample(1, TABLE, with_anon(PSS))
    assert sample.workers == {3: 350, 4: 310} and sample.workers_anon == {3: 35, 4: 31}
    assert sample.roles == {TRAIN_WORKER: 660, BANK: 1001, OTHER: 130}
    assert sample.processes == 8


def test_a_process_gone_between_listing_and_reading_is_skipped():
    sample = take_sample(1, TABLE, lambda pid: None if pid in (4, 6) else (PSS[pid], 0))
    assert sample.workers == {3: 350} and sample.roles[BANK] == 1 and sample.processes == 6


def test_peaks_keep_each_figure_s_largest_value():
    later = {**PSS, 3: 100, 4: 600, 6: 5000}  # worker 3 shrinks, worker 4 and the bank grow
    peaks = Peaks()
    for pss in (PSS, later):
        peaks.add(take_sample(1, TABLE, with_anon(pss)))
    assert peaks.samples == 2
    assert peaks.workers == {3: 350, 4: 600} and peaks.per_worker == 600
    assert peaks.workers_anon == {3: 35, 4: 60} and peaks.per_worker_anon == 60
    assert peaks.roles == {TRAIN_WORKER: 750, BANK: 5001, OTHER: 130}
    assert peaks.total == sum(later[pid] for pid in range(1, 9))


def test_a_root_that_does_not_exist_gives_empty_samples():
    with MemorySampler(1 << 30, interval=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.errors == 0 and sampler.peaks.total == 0 and sampler.peaks.samples >= 1
