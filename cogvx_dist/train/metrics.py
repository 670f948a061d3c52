"""Training metrics: a JSONL file and TensorBoard event files, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per logged step to output_dir/metrics.jsonl, mirrored to TensorBoard."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record `values` for optimizer step `step`."""
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (the last record wins for a step logged twice after a resume).

    A last line that is not valid JSON is skipped: the run is still writing it, or died while writing it. Any other
    bad line (undecodable, not a JSON object, no integer "step") raises CogvxError naming the file and line."""
    path = Path(output_dir) / METRICS_FILE
    by_step: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if index == last:
                break  # torn final line: a step being written (or a crash mid-write)
            raise CogvxError(f"{path} line {index + 1}: not JSON ({err})") from None
        if not isinstance(record, dict):
            raise CogvxError(f"{path} line {index + 1}: expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise CogvxError(f"{path} line {index + 1}: no integer \"step\" in the record")
        by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]
