"""Every `instdisc bench` / `instdisc scale` subcommand has a module that declares its
options and runs it; a user's mistake is one line and exit status 2."""

import argparse
import importlib

from trainer.cli import BENCHMARKS, build_parser, main


def _subcommands(parser: argparse.ArgumentParser, name: str) -> set[str]:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[name]
    return set(next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_every_benchmark_subcommand_has_a_module_that_declares_and_runs_it():
    parser = build_parser()
    registered = {(group, name) for group in ("bench", "scale") for name in _subcommands(parser, group)}
    assert registered == set(BENCHMARKS)
    for module, _ in BENCHMARKS.values():
        loaded = importlib.import_module(module)
        assert callable(loaded.add_arguments) and callable(loaded.run), module


def test_exporting_a_folder_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "encoder.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "not a checkpoint" in err, err
