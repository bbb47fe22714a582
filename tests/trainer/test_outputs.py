"""The run's outputs as the driver writes them up: the warnings about kNN below the
untrained encoder's, and the table `instdisc train` ends with."""

from pathlib import Path

from trainer.outputs import below_untrained, run_warnings, table


def test_an_evaluation_below_the_untrained_encoder_is_named_with_both_figures():
    row = {"step": 300, "knn_top1": 0.712}
    warning = below_untrained(row, 0.7619)
    assert "71.20 %" in warning and "step 300" in warning and "76.19 %" in warning
    assert below_untrained(row, 0.70) is None  # above it
    assert below_untrained(row, None) is None  # not measured (an old run)
    assert below_untrained({"step": 200, "knn_top1": float("nan")}, 0.9) is None  # not evaluated


def test_a_run_warns_of_its_end_below_the_untrained_encoder_and_of_its_dips_in_one_line():
    nan = float("nan")

    def epochs(*top1):
        return [{"step": e, "knn_top1": t} for e, t in enumerate(top1, start=1)]

    assert run_warnings(epochs(0.81, 0.85), 0.80) == []
    (dipped,) = run_warnings(epochs(0.70, nan, 0.60, 0.75, 0.90), 0.80)  # dips early, ends above: one line
    assert all(figure in dipped for figure in ("80.00 %", "3 of 4", "steps 1 to 4", "60.00 % at step 3"))
    (ended,) = run_warnings(epochs(0.85, 0.70), 0.80)  # ends below, the one dip: that epoch's warning
    assert ended == below_untrained({"step": 2, "knn_top1": 0.70}, 0.80)
    both = run_warnings(epochs(0.70, 0.75), 0.80)  # ends below after an earlier dip: both
    assert both[0] == below_untrained({"step": 2, "knn_top1": 0.75}, 0.80) and "2 of 2" in both[1]
    assert run_warnings(epochs(0.70), None) == []


SUMMARY = {
    "knn_top1": 0.8123,
    "knn_top5": 0.9901,
    "knn_top1_untrained": None,
    "epochs": 2,
    "steps": 1234,
    "images_per_sec": 1500.4,
    "train_seconds": 61.2,
    "bank_rtt_ms": 1.25,
    "bank_wait_ms": 0.04,
    "eval_seconds": 2.0,
    "knn_source": "bank",
    "refresh_seconds": None,
    "worker_restarts": 1,
    "bank_outage_details": [{"shard": 1, "seconds": 3.21, "rank": 0}, {"shard": 1, "seconds": 2.5, "rank": 1}],
}


def test_the_table_shows_the_figures_and_where_the_outputs_are():
    rows = dict(
        tuple(cell.strip() for cell in line.strip("|").split("|"))
        for line in table(SUMMARY, Path("/runs/x")).splitlines()
        if line.startswith("|")
    )
    assert rows["kNN top-1"] == "81.23 %" and rows["kNN top-1, untrained"] == "-"
    assert rows["epochs, steps"] == "2, 1,234" and rows["images/s"] == "1,500"
    assert rows["bank outages"].startswith("2 (shard 1; longest 3.2 s") and rows["worker restarts"] == "1"
    assert rows["outputs"] == "/runs/x" and "bank refresh" not in rows and "linear top-1" not in rows
    with_probe = dict(SUMMARY, linear_top1=0.5, linear_top5=0.75, refresh_seconds=1.5, bank_outage_details=[])
    text = table(with_probe, Path("/runs/x"))
    assert "| linear top-5" in text and "75.00 %" in text and "| bank refresh" in text and "none" in text
