"""Every `instdisc bench` / `instdisc scale` subcommand has a runner that imports."""

import argparse
import importlib

from trainer.cli import BENCHMARKS, build_parser


def _subcommands(parser: argparse.ArgumentParser, name: str) -> set[str]:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[name]
    return set(next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_every_benchmark_subcommand_has_a_runner():
    parser = build_parser()
    registered = {(group, name) for group in ("bench", "scale") for name in _subcommands(parser, group)}
    assert registered == set(BENCHMARKS)
    for module, function in BENCHMARKS.values():
        assert callable(getattr(importlib.import_module(module), function)), (module, function)
