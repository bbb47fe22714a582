"""The import graph of the project's own modules: layers import downward only.

Every import counts, the function-local ones too: a cycle hidden behind a local import
is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "bank_server", "benchmarks", "protos")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code, resolved to the longest name that is
    one of ours (`from bank_server import tensors` is bank_server.tensors), or the top-level name
    of a third-party one (`torch`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            ours = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES), None)
            if ours is not None:
                found.add(ours)
            elif parts[0] not in PACKAGES:
                found.add(parts[0])
    return found


GRAPH = {module: imports_of(path) - {module} for module, path in MODULES.items()}


def cycles() -> list[list[str]]:
    """Every import cycle among our modules, each as the path that closes it."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in MODULES:
                continue
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    return found


def reachable(module: str) -> set[str]:
    """Every module `module` imports, directly or through our own modules."""
    seen, todo = set(), [module]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_module_imports_itself_back():
    assert cycles() == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("bank_server")))
def test_the_bank_service_needs_neither_torch_nor_the_trainer(module):
    needs = reachable(module)
    assert not {"torch", "torchvision"} & needs
    assert not {m for m in needs if m.split(".")[0] in ("trainer", "benchmarks")}


def test_the_bank_client_does_not_load_the_server():
    assert not {"bank_server.server", "bank_server.recovery", "bank_server.snapshot"} & reachable("bank_server.client")


def test_ray_is_imported_only_where_the_actor_wrapper_needs_it():
    users = {m for m in MODULES if m.startswith("bank_server") and "ray" in GRAPH[m]}
    assert users <= {"bank_server.ray_bank"}


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"], ["bank", "serve", "--help"]])
def test_the_command_line_imports_benchmarks_only_for_their_commands(command):
    """`instdisc` builds its parser, serves and trains without importing benchmarks/."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trainer.cli", *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer" in imported
    assert not {name for name in imported if name.split(".")[0] == "benchmarks"}


def test_the_hook_every_ray_worker_runs_loads_no_torch():
    """Ray runs `worker_process_setup_hook` in every worker process, the bank's shard actors
    included: the module it lives in must be light, or each of them imports torch."""
    assert "quiet_ray_workers" in MODULES["trainer.console"].read_text()
    assert 'worker_process_setup_hook": quiet_ray_workers' in MODULES["trainer.launch"].read_text()
    assert not {"torch", "torchvision", "matplotlib"} & reachable("trainer.console")


def test_the_tensorboard_writer_actor_loads_no_torch():
    """The run's event writer is a Ray actor process of its own: torch there would cost
    every run a second of CPU and the memory of a second torch."""
    assert not {"torch", "torchvision", "matplotlib"} & reachable("trainer.live_tensorboard")
