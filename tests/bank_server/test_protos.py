"""The committed generated code is exactly what protos/bank.proto generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto(tmp_path):
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "bank.proto").write_bytes((ROOT / "protos" / "bank.proto").read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protos/bank.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in ("bank_pb2.py", "bank_pb2.pyi", "bank_pb2_grpc.py"):
        generated = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert generated == committed, f"protos/{name} is stale: run `make protos`"
