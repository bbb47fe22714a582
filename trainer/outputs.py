"""A run's outputs, written by the driver from what the workers returned: summary.json,
metrics.csv, curves.png, the checkpoint and encoder.pt, the linear
probe's figures (eval.linear), the warnings about a run that made kNN worse, and the
table the command ends with. The words for kNN figures (`percent`) live here too, for
the lines a run logs as it goes. The TensorBoard events are written as the run goes
(`trainer.live_tensorboard`)."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

from trainer.config import Config
from trainer.export import export_encoder
from trainer.linear import evaluate_linear

log = logging.getLogger(__name__)


def below_untrained(row: dict, untrained: float | None) -> str | None:
    """The warning for an evaluated history row whose kNN top-1 is below the untrained
    encoder's, or None. The one wording: the run logs it, summary.json keeps it."""
    top1 = row["knn_top1"]
    if untrained is None or row["step"] == 0 or math.isnan(top1) or top1 >= untrained:
        return None
    return (
        f"kNN top-1 {percent(top1)} at step {row['step']} is below the untrained encoder's "
        f"{percent(untrained)}: training made the features worse for kNN"
    )


def run_warnings(trained: list[dict], untrained: float | None) -> list[str]:
    """What summary.json warns of: a run that ends below the untrained encoder's kNN, and
    in one line the evaluations that dipped below it on the way. Small datasets
    often dip for their first few hundred steps and then rise well above (BENCHMARKS.md,
    the defaults), so each dip is logged as it happens but not kept one by one."""
    scored = [h for h in trained if not math.isnan(h["knn_top1"])]
    dips = [h for h in scored if below_untrained(h, untrained)]
    if not dips:
        return []
    warnings = []
    if scored[-1] is dips[-1]:
        warnings.append(below_untrained(scored[-1], untrained))
    if len(dips) > 1 or scored[-1] is not dips[-1]:
        lowest = min(dips, key=lambda h: h["knn_top1"])
        warnings.append(
            f"kNN top-1 was below the untrained encoder's {percent(untrained)} at {len(dips)} of "
            f"{len(scored)} evaluations (steps {dips[0]['step']} to {dips[-1]['step']}; lowest "
            f"{percent(lowest['knn_top1'])} at step {lowest['step']})"
        )
    return warnings


def write_outputs(config: Config, output: Path, outcome: dict, checkpoint, wall_seconds: float, sha: str) -> dict:
    """Every output of a run into `output`, from the workers' `outcome` and Ray Train's
    last `checkpoint` (None when it wrote none); returns the summary (summary.json)."""
    history = outcome["history"]
    trained = [h for h in history if h["step"] > 0]
    final = trained[-1]
    # The last evaluation: a run that stopped early may end on a row without one.
    scored = next((h for h in reversed(trained) if not math.isnan(h["knn_top1"])), None)
    initial = next((h for h in history if h["step"] == 0), None)
    checkpoint_dir = output / "checkpoint"
    if checkpoint is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint.to_directory(str(checkpoint_dir))  # also when the storage is remote (s3://...)
        export_encoder(checkpoint_dir, output / "encoder.pt")
    summary = {
        "knn_top1": scored["knn_top1"] if scored else None,
        "knn_top5": scored["knn_top5"] if scored else None,
        "knn_epoch": scored["epoch"] if scored else None,
        "knn_step": scored["step"] if scored else None,
        "knn_top1_untrained": initial["knn_top1"] if initial else None,
        "knn_source": config.eval.source,
        "epochs": final["epoch"],
        "steps": outcome["steps"],
        "images_per_sec": sum(h["images_per_sec"] for h in trained) / len(trained),
        "train_seconds": outcome["train_seconds"],
        "paused_seconds": outcome.get("paused_seconds"),
        "wall_seconds": wall_seconds,
        "final_loss": final["loss"],
        "bank_rtt_ms": final["bank_rtt_ms"],
        "bank_rtt_p50_ms": final.get("bank_rtt_p50_ms"),  # rank 0's, over the last row's steps
        "bank_rtt_p99_ms": final.get("bank_rtt_p99_ms"),
        "bank_wait_ms": final["bank_wait_ms"],
        "eval_seconds": _mean(h.get("eval_seconds", math.nan) for h in trained),
        "refresh_seconds": _mean(h.get("refresh_seconds", math.nan) for h in trained),
        "dataset": config.data.name,
        "loss": config.loss.kind,
        "git_sha": sha,
        "warnings": run_warnings(trained, initial["knn_top1"] if initial else None),
        # Each worker's record of each shard outage it saw (so a shard that every worker
        # saw go counts once per worker), since the run began; and Ray Train's restarts of
        # the workers in this launch, with the checkpoint step each went on from.
        "bank_outages": len(outcome["bank_outages"]),
        "bank_outage_details": outcome["bank_outages"],
        "worker_restarts": len(outcome["worker_restarts"]),
        "worker_restart_steps": outcome["worker_restarts"],
        # What scored the encoder ("knn", "linear"), and why nothing did (no evaluation
        # split, no labels) or None; data.on_bad_image=skip's images left out, each once.
        "evaluated": [] if outcome.get("evaluation_skipped") else ["knn"],
        "evaluation_skipped": outcome.get("evaluation_skipped"),
        "bad_images_skipped": outcome.get("bad_images_skipped", 0),
    }
    fields = [
        "epoch",
        "step",
        "loss",
        "knn_top1",
        "knn_top5",
        "lr",
        "images_per_sec",
        "seconds",
        "bank_rtt_ms",
        "bank_rtt_p50_ms",
        "bank_rtt_p99_ms",
        "bank_wait_ms",
        "eval_seconds",
        "refresh_seconds",
    ]
    with open(output / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))  # again below, with the probe's figures
    plot_curves(history, output / "curves.png")
    if config.eval.linear and summary["evaluation_skipped"]:
        log.info(f"eval.linear: no linear probe, {summary['evaluation_skipped']}")
    elif config.eval.linear and checkpoint is not None:
        # The probe of the run's final encoder (encoder.pt, the backbone), on the run's data.
        linear = evaluate_linear(str(output / "encoder.pt"), config, output)
        summary.update(linear_top1=linear["linear_top1"], linear_top5=linear["linear_top5"])
        summary["evaluated"].append("linear")
    elif config.eval.linear:
        log.warning("eval.linear: no linear probe, the run left no checkpoint to export an encoder from")
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(values) -> float | None:
    """Mean of the finite values; None when there is none (never NaN in summary.json)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [h for h in history if not math.isnan(h["loss"])]
    ax_loss.plot([h["step"] for h in trained], [h["loss"] for h in trained], marker="o")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    evaluated = [h for h in history if not math.isnan(h["knn_top1"])]
    ax_knn.plot([h["step"] for h in evaluated], [100 * h["knn_top1"] for h in evaluated], marker="o", label="top-1")
    ax_knn.plot([h["step"] for h in evaluated], [100 * h["knn_top5"] for h in evaluated], marker="s", label="top-5")
    ax_knn.set(xlabel="step (0 = untrained encoder)", ylabel="weighted kNN accuracy (%)", title="kNN accuracy")
    ax_knn.legend()
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(summary: dict, output: Path) -> str:
    """The table `instdisc train` ends with: the summary's figures, and where the outputs are."""
    rows = [
        ("kNN top-1", percent(summary["knn_top1"])),
        ("kNN top-5", percent(summary["knn_top5"])),
        ("kNN top-1, untrained", percent(summary["knn_top1_untrained"])),
        *(
            [("linear top-1", percent(summary["linear_top1"])), ("linear top-5", percent(summary["linear_top5"]))]
            if "linear_top1" in summary
            else []
        ),
        ("epochs, steps", f"{summary['epochs']}, {summary['steps']:,}"),
        ("images/s", f"{summary['images_per_sec']:,.0f}"),
        ("train time", f"{summary['train_seconds']:.0f} s"),
        ("bank round trip", f"{summary['bank_rtt_ms']:.1f} ms (waited {summary['bank_wait_ms']:.1f} ms)"),
        (
            ("evaluation", f"skipped: {summary['evaluation_skipped']}")
            if summary.get("evaluation_skipped")
            else ("kNN evaluation", _seconds(summary["eval_seconds"]) + f" each (eval.source={summary['knn_source']})")
        ),
        *([("bad images skipped", str(summary["bad_images_skipped"]))] if summary.get("bad_images_skipped") else []),
        *(
            [("bank refresh", _seconds(summary["refresh_seconds"]) + " each")]
            if summary["refresh_seconds"] is not None
            else []
        ),
        ("bank outages", _outages(summary["bank_outage_details"])),
        ("worker restarts", str(summary["worker_restarts"])),
        ("outputs", str(output)),
    ]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(v) for _, v in rows) + 2) + "+"
    return "\n".join([line, *(f"| {key:<{width}} | {value:<{len(line) - width - 7}} |" for key, value in rows), line])


def _outages(outages: list[dict]) -> str:
    """'none', or how many (seen by a worker each), which shards, the longest."""
    if not outages:
        return "none"
    shards = ", ".join(str(s) for s in sorted({o["shard"] for o in outages}))
    return f"{len(outages)} (shard {shards}; longest {max(o['seconds'] for o in outages):.1f} s; each worker's count)"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def percent(fraction: float | None) -> str:
    """A kNN figure for people: '-' where there is none (a row not evaluated)."""
    return "-" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.2f} %"
