"""The client says what happened: a shard process killed (by pid, one this test started)
in the middle of a stream of Steps, restarted with the same command a moment later,
recovers from its update log; the client logs the outage once, logs its end once,
records it, and the stream finishes."""

import logging
import threading
import time

import numpy as np

from bank_server.client import BankClient
from tests.conftest import free_port
from tests.processes import ServerProcess

N, D, SHARDS = 400, 16, 2
STEPS = 150  # the stream's length: bounded
DOWN_S = 1.5  # how long shard 1 stays dead


def shard_args(shard: int, port: int, folder) -> list[str]:
    return [
        "-m",
        "bank_server",
        "--shard-id",
        str(shard),
        "--num-shards",
        str(SHARDS),
        "--rows",
        str(N),
        "--dim",
        str(D),
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--snapshot-dir",
        str(folder),
        "--fsync",
        "always",
    ]


def start(args, log_path) -> ServerProcess:
    server = ServerProcess(args, stderr=log_path)
    server.wait_serving(120)
    return server


def test_a_killed_and_restarted_shard_is_logged_once_each_way_and_recorded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bank_server.client")
    ports = [free_port() for _ in range(SHARDS)]
    servers = [start(shard_args(s, ports[s], tmp_path), tmp_path / f"shard-{s}.log") for s in range(SHARDS)]
    restarted = None
    try:
        client = BankClient([s.address for s in servers], timeout=60)
        rng = np.random.default_rng(0)
        done, failure = [], []

        def stream():
            try:
                for i in range(STEPS):
                    idx = rng.choice(N, 32, replace=False)
                    f = rng.standard_normal((32, D)).astype(np.float32)
                    client.step(idx, f / np.linalg.norm(f, axis=1, keepdims=True), 0.5, idx, 16)
                    done.append(i)
                    time.sleep(0.01)
            except Exception as error:  # the test's assertion says what it was
                failure.append(error)

        writer = threading.Thread(target=stream)
        writer.start()
        deadline = time.monotonic() + 60
        while len(done) < 20 and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(done) >= 20, failure
        servers[1].proc.kill()  # SIGKILL, of the process this test started
        servers[1].proc.wait(30)
        killed_at = time.monotonic()
        time.sleep(DOWN_S)
        restarted = start(shard_args(1, ports[1], tmp_path), tmp_path / "shard-1-again.log")
        assert restarted.address == servers[1].address
        writer.join(120)
        assert not writer.is_alive() and not failure, failure
        assert len(done) == STEPS
        # Shard 1 recovered every update from its log, and none was applied twice.
        assert [d["updates_applied"] for d in client.describe()] == [STEPS, STEPS]

        outages = client.outages()
        assert len(outages) == 1, outages
        outage = outages[0]
        assert (outage["shard"], outage["address"], outage["code"], outage["ongoing"]) == (
            1,
            servers[1].address,
            "UNAVAILABLE",
            False,
        )
        assert DOWN_S * 0.8 <= outage["seconds"] <= time.monotonic() - killed_at + 1
        assert outage["retries"] >= 2

        lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "bank_server.client"]
        down = [m for level, m in lines if level == logging.WARNING and "unreachable" in m]
        back = [m for level, m in lines if level == logging.INFO and "reachable again" in m]
        # One line when it went, one when it came back, each naming the shard's address;
        # a reminder only past 10 s.
        assert len(down) == 1 and servers[1].address in down[0] and "UNAVAILABLE" in down[0]
        assert len(back) == 1 and servers[1].address in back[0]
        client.close()
    finally:
        for server in [*servers, restarted]:
            if server is not None:
                server.stop()
