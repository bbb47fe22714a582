"""`instdisc scale data` without training: its settings, its checks and its report parts
(the whole command is tested with --quick elsewhere)."""

import argparse

import pytest

from benchmarks.scale_data import (DEFAULTS, IN_MEMORY, QUICK, STREAM, _settings, add_scale_data_arguments, checks,
                                   reader_section, write_plots)

MB = 1_000_000


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_scale_data_arguments(parser)
    return parser.parse_args(list(argv))


def test_settings_come_from_the_flags_then_quick_then_the_defaults():
    default = _settings(parse())
    assert default["sizes"] == [60_000, 600_000, 3_000_000] and default["steps"] == DEFAULTS["steps"]
    assert default["readers"] == ["pyarrow", "pyarrow-2", "ray-data"] and default["reader_size"] == 600_000
    quick = _settings(parse("--quick"))
    assert quick["sizes"] == [2000, 6000] and quick["steps"] == QUICK["steps"] and quick["reader_size"] == 2000
    given = _settings(parse("--quick", "--sizes", "5000,1000", "--readers", "none", "--steps", "3"))
    assert given["sizes"] == [1000, 5000] and given["readers"] == [] and given["steps"] == 3
    with pytest.raises(argparse.ArgumentTypeError, match="spark"):
        _settings(parse("--readers", "pyarrow,spark"))


def row(reader, images, peak, anon, per_sec, error=None):
    return {"point": f"{reader}-{images}", "reader": reader, "images": images, "peak_rss_bytes": peak,
            "peak_anon_bytes": anon, "bank_pss_bytes": images * 300, "other_pss_bytes": 2000 * MB,
            "images_per_sec": per_sec, "error": error}


def test_checks_compare_the_largest_streamed_size_with_the_smallest_and_stream_with_memory():
    rows = [row(STREAM, 1000, 700 * MB, 300 * MB, 950), row(IN_MEMORY, 1000, 650 * MB, 250 * MB, 1000),
            row(STREAM, 9000, 800 * MB, 320 * MB, 900)]
    lines = checks(rows)
    assert "ratio 1.14 (target <= 1.2) PASS" in lines[0] and "ratio 1.07" in lines[0]
    assert "950 against 1,000 images/s: ratio 0.95 (target >= 0.9) PASS" in lines[1]
    rows[2]["peak_rss_bytes"], rows[0]["images_per_sec"] = 900 * MB, 800
    assert all("FAIL" in line for line in checks(rows))
    rows[1]["error"] = "exit status 1"
    assert "not measured" in checks(rows)[1]


def test_repeats_count_with_their_size_s_largest_peak_and_mean_speed():
    rows = [row(STREAM, 1000, 900 * MB, 300 * MB, 900), row(IN_MEMORY, 1000, 650 * MB, 250 * MB, 1000),
            row(STREAM, 9000, 1000 * MB, 320 * MB, 900), row(STREAM, 1000, 800 * MB, 330 * MB, 1000),
            row(IN_MEMORY, 1000, 640 * MB, 250 * MB, 1000), row(STREAM, 9000, 990 * MB, 320 * MB, 800, "timed out")]
    lines = checks(rows)
    assert ("peak 1,000 MB at 9,000 images against 900 MB at 1,000 (largest of 2 runs): ratio 1.11 (target <= 1.2) "
            "PASS; without mapped files 320 MB against 330 MB: ratio 0.97") in lines[0]
    assert "950 against 1,000 images/s (means over the runs): ratio 0.95" in lines[1]


def test_the_reader_section_and_the_plots(tmp_path):
    readers = [{"reader": "pyarrow-2", "images": 100, "files": 1, "images_per_sec": 2000.0, "seconds": 0.05,
                "startup_seconds": 0.1, "peak_pss_bytes": 500 * MB, "wall_seconds": 1.0, "load_avg": 1.0,
                "error": None},
               {"reader": "ray-data", "images": 100, "files": 1, "images_per_sec": 1000.0, "seconds": 0.1,
                "startup_seconds": 10.0, "peak_pss_bytes": 2000 * MB, "wall_seconds": 12.0, "load_avg": 1.0,
                "error": None}]
    text = "\n".join(reader_section(readers, 100))
    assert "| ray-data | 100 |" in text and "Ray Data reads at 0.50x the speed of `pyarrow-2` with 4.0x" in text
    rows = [row(STREAM, 1000, 700 * MB, 300 * MB, 950), row(IN_MEMORY, 1000, 650 * MB, 250 * MB, 1000),
            row(STREAM, 9000, 800 * MB, 320 * MB, 900, error="timed out")]
    for path in write_plots(tmp_path, rows):
        assert path.stat().st_size > 1000
