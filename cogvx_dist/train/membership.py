"""Who trained when: rank 0 of every launch of a run appends one line to output_dir/membership.jsonl, so an elastic
run (torchrun restarting the workers on the nodes that are left, or on a node that came back) says where its world
size changed and how much work each change cost. `cogvx report` marks the changes on the loss plot.

A line: time (Unix seconds), world_size, previous_world_size (null at the first launch), resumed_from_step, and
steps_redone: the steps the previous launch logged past the checkpoint this launch resumed from (exact with
log.every_steps 1; with a longer log interval the steps after the last log line are not counted). The resume then
drops those steps' rows from metrics.jsonl and the traces (train/records.py), so each step appears once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.metric_table import read_metrics
from cogvx_dist.core.run_folder import RunFolder


def read_launches(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every launch recorded in the run folder, oldest first (a torn last line, from a crash mid-write, skipped)."""
    path = RunFolder(output_dir).membership
    if not path.is_file():
        return []
    launches = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("world_size"), int):
            launches.append(record)
    return launches


def changes(output_dir: str | Path) -> list[dict[str, Any]]:
    """The launches at another world size than the one before: the run's membership changes."""
    return [launch for launch in read_launches(output_dir)
            if launch.get("previous_world_size") not in (None, launch["world_size"])]


def last_logged_step(output_dir: str | Path) -> int:
    """The last step metrics.jsonl holds: read before a resume drops the rows of the steps it will train again."""
    try:
        logged = read_metrics(output_dir)
    except CogvxError:  # a damaged metrics file costs the count, not the run
        return 0
    return logged[-1]["step"] if logged else 0


def record_launch(output_dir: str | Path, world_size: int, resumed_from_step: int, last_step: int) -> dict[str, Any]:
    """Append this launch's line (rank 0, after the restore): `last_step` is the last step the launches before
    logged (last_logged_step, read before the restore)."""
    before = read_launches(output_dir)
    record = {
        "time": time.time(),
        "world_size": world_size,
        "previous_world_size": before[-1]["world_size"] if before else None,
        "resumed_from_step": resumed_from_step,
        "steps_redone": max(0, last_step - resumed_from_step) if before else 0,
    }
    path = RunFolder(output_dir).membership
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record
