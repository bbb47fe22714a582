"""How a run finds its Ray: RAY_ADDRESS when set, else a private local one."""

import logging
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
    from trainer.outputs import below_untrained

    epoch = {"epoch": 3, "knn_top1": 0.712}
    warning = below_untrained(epoch, 0.7619)
    assert "71.20 %" in warning and "epoch 3" in warning and "76.19 %" in warning
    assert below_untrained(epoch, 0.70) is None                                   # above it
    assert below_untrained(epoch, None) is None                                   # not measured (an old run)
    assert below_untrained({"epoch": 2, "knn_top1": float("nan")}, 0.9) is None   # not evaluated


def test_more_negatives_than_bank_rows_are_capped_at_the_rows_and_said(caplog):
    from trainer.config import load_config
    from trainer.launch import check_against_dataset

    config = load_config(None, ["loss.kind=infonce", "loss.negatives=4096"])
    with caplog.at_level(logging.INFO, logger="trainer"):
        check_against_dataset(config, train_rows=1348, image_side=32)
    assert config.loss.negatives == 1348
    assert "K = 1348" in caplog.text
    check_against_dataset(config, train_rows=60000, image_side=32)
    assert config.loss.negatives == 1348


def test_a_run_warns_of_its_end_below_the_untrained_encoder_and_of_its_dips_in_one_line():
    from trainer.outputs import below_untrained, run_warnings

    nan = float("nan")
    def epochs(*top1):
        return [{"epoch": e, "knn_top1": t} for e, t in enumerate(top1, start=1)]

    assert run_warnings(epochs(0.81, 0.85), 0.80) == []
    (dipped,) = run_warnings(epochs(0.70, nan, 0.60, 0.75, 0.90), 0.80)  # dips early, ends above: one line
    assert all(figure in dipped for figure in ("80.00 %", "3 of 4", "1 to 4", "60.00 % at epoch 3"))
    (ended,) = run_warnings(epochs(0.85, 0.70), 0.80)  # ends below, the one dip: that epoch's warning
    assert ended == below_untrained({"epoch": 2, "knn_top1": 0.70}, 0.80)
    both = run_warnings(epochs(0.70, 0.75), 0.80)  # ends below after an earlier dip: both
    assert both[0] == below_untrained({"epoch": 2, "knn_top1": 0.75}, 0.80) and "2 of 2" in both[1]
    assert run_warnings(epochs(0.70), None) == []
