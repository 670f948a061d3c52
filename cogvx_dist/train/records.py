"""The run's line-per-event records (metrics.jsonl, trace/rank-N.jsonl, bad_samples.jsonl): kept free of the
rows of steps that a resume trains again, so every step appears once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.run_folder import RunFolder


def note_bad_samples(run: RunFolder, step: int, rank: int, bad: list[dict[str, Any]]) -> int:
    """Append the samples a rank skipped in this step to bad_samples.jsonl; their count."""
    if not bad:
        return 0
    lines = "".join(json.dumps({"step": step, "rank": rank, "time": time.time(), **item}) + "\n" for item in bad)
    # One write of whole lines with O_APPEND: ranks appending at once do not tear each other's lines.
    descriptor = os.open(run.bad_samples, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, lines.encode())
    finally:
        os.close(descriptor)
    return len(bad)


def truncate(run: RunFolder, ranks: RankInfo, step: int) -> None:
    """Drop rows of steps after `step` (a resume trains them again): rank 0 the shared files, each rank its trace."""
    if ranks.is_main:
        _keep_steps_up_to(run.metrics, step)
        _keep_steps_up_to(run.bad_samples, step)
    _keep_steps_up_to(run.trace_file(ranks.rank), step)


def _keep_steps_up_to(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from the crash that ended the earlier run
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))
