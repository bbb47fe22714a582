"""What bank_server's modules import: no cycle (function-local imports included), the
client none of the server's side, and the service neither training nor Ray."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bank_server"


def _imports(path: Path) -> set[str]:
    """The bank_server modules `path` imports, wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {f"bank_server.{p.stem}" for p in PACKAGE.glob("*.py")}
    return {name for name in found if name in modules}


def test_no_module_of_bank_server_imports_itself_back():
    graph = {f"bank_server.{p.stem}": _imports(p) for p in PACKAGE.glob("*.py")}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += graph[name]
        return seen

    assert [name for name in graph if name in reaches(name)] == []


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
