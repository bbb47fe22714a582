"""How a run finds its Ray: RAY_ADDRESS when set, else a private local one."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = ("from trainer.launch import init_ray; init_ray(); import ray; "
         "print('cpus', int(ray.cluster_resources()['CPU'])); ray.shutdown()")


def test_a_stale_cluster_file_does_not_capture_a_run_without_ray_address():
    # A short temp dir: Ray's socket paths live under it and must stay under 108 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (temp / "ray").mkdir()
    # What a local Ray that died uncleanly leaves behind: the address of a dead cluster.
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
    bare = subprocess.run([sys.executable, "-c", "import ray; ray.init(num_cpus=1, include_dashboard=False)"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "existing cluster" in bare.stderr  # what users met before
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"cpus {os.cpu_count()}" in run.stdout


def test_an_epoch_below_the_untrained_encoder_is_named_with_both_figures():
    from trainer.launch import below_untrained

    epoch = {"epoch": 3, "knn_top1": 0.712}
    assert below_untrained(epoch, 0.7619) == ("kNN top-1 71.20 % at epoch 3 is below the untrained encoder's "
                                              "76.19 %: training made the features worse for kNN")
    assert below_untrained(epoch, 0.70) is None                                   # above it
    assert below_untrained(epoch, None) is None                                   # not measured (an old run)
    assert below_untrained({"epoch": 2, "knn_top1": float("nan")}, 0.9) is None   # not evaluated


def test_more_negatives_than_bank_rows_are_capped_at_the_rows_and_said(capsys):
    from trainer.config import load_config
    from trainer.launch import check_against_dataset

    config = load_config(None, ["loss.kind=infonce", "loss.negatives=4096"])
    check_against_dataset(config, train_rows=1348, image_side=32)
    assert config.loss.negatives == 1348
    assert "loss.negatives=4096 exceeds the 1348 training images (the bank's rows): K = 1348" in capsys.readouterr().out
    check_against_dataset(config, train_rows=60000, image_side=32)
    assert config.loss.negatives == 1348


def test_a_run_warns_of_its_end_below_the_untrained_encoder_and_of_its_dips_in_one_line():
    from trainer.launch import run_warnings

    nan = float("nan")
    def epochs(*top1):
        return [{"epoch": e, "knn_top1": t} for e, t in enumerate(top1, start=1)]

    assert run_warnings(epochs(0.81, 0.85), 0.80) == []
    dipped = run_warnings(epochs(0.70, nan, 0.60, 0.75, 0.90), 0.80)  # dips early, ends above
    assert dipped == ["kNN top-1 was below the untrained encoder's 80.00 % at 3 of 4 evaluated epochs (1 to 4; "
                      "lowest 60.00 % at epoch 3)"]
    ended = run_warnings(epochs(0.85, 0.70), 0.80)
    assert ended == ["kNN top-1 70.00 % at epoch 2 is below the untrained encoder's 80.00 %: training made the "
                     "features worse for kNN"]
    both = run_warnings(epochs(0.70, 0.75), 0.80)
    assert both[0].startswith("kNN top-1 75.00 % at epoch 2 is below") and "at 2 of 2 evaluated epochs" in both[1]
    assert run_warnings(epochs(0.70), None) == []
