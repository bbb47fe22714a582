"""`python -m benchmarks.durability` (and a CLI that registers `run_durability`) runs end
to end on tiny banks and writes its JSON."""

import argparse
import json

from benchmarks.durability import add_durability_arguments, run_durability


def test_the_durability_bench_runs_tiny_through_its_registrable_entry_point(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_durability_arguments(parser)
    out = tmp_path / "durability.json"
    args = parser.parse_args(["--recovery-rows", "2000", "--log-rows", "2000", "--snapshot-rows", "5000", "--runs", "1",
                              "--alone", "5", "--batch", "32", "--negatives", "64", "--dim", "16", "--dir",
                              str(tmp_path), "--json", str(out)])
    assert run_durability(args) == 0
    printed = capsys.readouterr().out
    assert "recovery: snapshot of" in printed and "Step p99 while snapshotting, worst of 1 runs" in printed
    results = json.loads(out.read_text())
    assert set(results) == {"recovery", "snapshot"} and len(results["snapshot"]["runs"]) == 1
