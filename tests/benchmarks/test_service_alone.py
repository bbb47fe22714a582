"""The service does not carry the benchmarks, nor what only they and training need."""

import subprocess
import sys

SERVICE = "bank_server.server, bank_server.client, bank_server.cli, bank_server.shard, bank_server.servicer"


def test_the_bank_service_imports_neither_torch_nor_matplotlib_nor_ray_nor_the_benchmarks():
    code = (
        f"import sys, {SERVICE}; "
        "bad = [m for m in ('torch', 'matplotlib', 'ray', 'benchmarks') if m in sys.modules]; assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
