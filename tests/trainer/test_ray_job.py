"""`ray job submit` against a real head (`ray start --head`) on loopback, as a user runs
it on an existing cluster."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
JOB_CONFIG = """\
data: {name: fashion-mnist, subset: 2048, test_subset: 500}
model: {arch: small, width: 16}
augment: {crop_min: 0.5}
loss: {kind: softmax, temperature: 0.1}
bank: {shards: 2, timeout: 5}
train: {epochs: 1, batch_size: 128, lr: 0.06, workers: 2, log_every: 10}
"""


def _accepts_jobs(url: str) -> bool:
    """The dashboard answers and a node's job agent takes a job (it starts later)."""
    from ray.job_submission import JobSubmissionClient

    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            pass
        JobSubmissionClient(url).submit_job(entrypoint="true")
        return True
    except (OSError, RuntimeError):
        return False


@pytest.fixture(scope="module")
def ray_head():
    """A 2-CPU head with the job server on loopback, stopped (whole process group) afterwards."""
    # Short: Ray's Unix sockets live under it and their paths have a ~107-byte limit.
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    dashboard = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the cluster's python is this venv's
        "RAY_AUTH_MODE": "disabled",
    }
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            dashboard.rsplit(":", 1)[1],
            "--include-dashboard",
            "true",
            "--temp-dir",
            temp,
            "--disable-usage-stats",
            # The agent binds a port the kernel picks: the fixed default (52365) may be held
            # by another Ray here, and a port picked in advance may be taken meanwhile; either
            # leaves the agent up without its HTTP server, so no job could be submitted.
            "--dashboard-agent-listen-port",
            "0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ready = wait_until(lambda: _accepts_jobs(dashboard) or head.poll() is not None, timeout=120, interval=1)
        assert head.poll() is None, "ray start --head exited"
        assert ready, f"the head took no job within 120 s; its agent's log ends:\n{_agent_log_tail(temp)}"
        yield dashboard, env
    finally:
        _stop_group(head)


def _agent_log_tail(temp: str) -> str:
    logs = sorted(Path(temp).glob("session_*/logs/dashboard_agent*.log"))
    return "\n".join(log.read_text(errors="replace")[-3000:] for log in logs) or "(no agent log)"


def _stop_group(process: subprocess.Popen) -> None:
    """SIGKILL the head's whole process group and wait until it is gone. At once, not
    SIGTERM first: the head's temp dir is this module's own, and a graceful Ray shutdown
    costs about 15 s of the suite."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(10)  # reap the leader; init reaps the rest of the group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def submit(dashboard: str, env: dict, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            str(REPO),
            "--submission-id",
            submission_id,
            "--",
            *entrypoint,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def job_status(dashboard: str, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_status(submission_id)


def test_a_submitted_job_trains_and_writes_its_summary(ray_head, tmp_path):
    dashboard, env = ray_head
    config = tmp_path / "job.yaml"
    config.write_text(JOB_CONFIG)
    output = tmp_path / "results"
    done = submit(
        dashboard,
        env,
        "instdisc-ok",
        "python",
        "-m",
        "trainer",
        "--config",
        str(config),
        "--output-dir",
        str(output),
        "--name",
        "job",
        "eval.k=50",
    )
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-4000:]
    assert str(job_status(dashboard, "instdisc-ok")) == "SUCCEEDED"
    assert "img/s" in logs, logs[-4000:]  # the workers' progress lines reach the submitter
    summary = json.loads((output / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0 < summary["knn_top1"] <= 1
    assert (output / "ray" / "job").is_dir() and (output / "checkpoint" / "state.pt").exists()


def test_a_job_with_an_unreachable_bank_fails_fast_naming_the_address(ray_head, tmp_path):
    dashboard, env = ray_head
    config = tmp_path / "job.yaml"
    config.write_text(JOB_CONFIG)
    start = time.monotonic()
    done = submit(
        dashboard,
        env,
        "instdisc-no-bank",
        "python",
        "-m",
        "trainer",
        "--config",
        str(config),
        "--output-dir",
        str(tmp_path / "results"),
        "bank.addresses=127.0.0.1:1,127.0.0.1:2",
    )
    assert done.returncode != 0
    assert str(job_status(dashboard, "instdisc-no-bank")) == "FAILED"
    assert "127.0.0.1:1" in done.stdout + done.stderr and "UNAVAILABLE" in done.stdout + done.stderr
    assert time.monotonic() - start < 120


def test_a_job_with_a_relative_output_dir_is_refused(ray_head):
    dashboard, env = ray_head
    done = submit(dashboard, env, "instdisc-relative", "python", "-m", "trainer", "--output-dir", "runs/x")
    assert done.returncode != 0
    assert "relative" in done.stdout + done.stderr
