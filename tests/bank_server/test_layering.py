"""What bank_server's modules load when imported: the client none of the server's side,
and the service neither training nor Ray. The static import graph, cycles included, is
tests/test_layering.py's."""

import subprocess
import sys


def _loaded_by(modules: str) -> set[str]:
    code = f"import sys, {modules}; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_client_loads_nothing_of_the_servers_side():
    loaded = _loaded_by("bank_server.client")
    server_side = {
        "bank_server.server",
        "bank_server.servicer",
        "bank_server.recovery",
        "bank_server.snapshot",
        "bank_server.update_log",
        "bank_server.shard",
        "bank_server.metrics",
    }
    assert loaded & server_side == set()


def test_the_service_loads_neither_training_nor_ray():
    loaded = _loaded_by("bank_server.server, bank_server.client, bank_server.cli, bank_server.metrics")
    assert {name.split(".")[0] for name in loaded} & {"torch", "ray", "trainer", "benchmarks", "matplotlib"} == set()
