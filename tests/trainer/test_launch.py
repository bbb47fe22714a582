"""How a run finds its Ray: RAY_ADDRESS when set, else a private local one."""

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = (
    "from trainer.launch import init_ray; init_ray(); import ray; "
    "print('cpus', int(ray.cluster_resources()['CPU'])); ray.shutdown()"
)


def test_a_stale_cluster_file_does_not_capture_a_run_without_ray_address():
    # A short temp dir: Ray's socket paths live under it and must stay under 108 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (temp / "ray").mkdir()
    # What a local Ray that died uncleanly leaves behind: the address of a dead cluster.
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
    bare = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(num_cpus=1, include_dashboard=False)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bare.returncode != 0 and "existing cluster" in bare.stderr  # what users met before
    run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"cpus {os.cpu_count()}" in run.stdout


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
