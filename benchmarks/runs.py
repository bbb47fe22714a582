"""The training runs of the sweeps (`instdisc scale train`, `instdisc bench defaults`):
one `launch` per point in a folder of its own, its console output in ``log.txt``, its
resolved config in ``point.json``. A point that finished there before with the same
config is read back, not trained again, so an interrupted sweep resumes (a point
stopped mid-run resumes from its last checkpoint); one trained with another config is
an error, since resuming it would mix two configs."""

from __future__ import annotations

import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from trainer.config import Config, ConfigError
from trainer.launch import launch

POINT_CONFIG = "point.json"


def finished(folder: Path, config: Config) -> dict | None:
    """The summary of the run that finished in `folder` with `config`, or None."""
    recorded = folder / POINT_CONFIG
    if not recorded.exists():
        return None
    if json.loads(recorded.read_text()) != config.to_dict():
        raise ConfigError(f"{folder} was trained with another config; use another --output-dir or delete that folder")
    summary = folder / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def train(config: Config, folder: Path, name: str) -> dict:
    """Run `config` into `folder` (line-buffered log, so `tail -f` follows it); its summary."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POINT_CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
    with open(folder / "log.txt", "a", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        return launch(config, folder, run_name=name)
