"""Every metric a training run records: one table read by the writer (metrics.jsonl and TensorBoard), the report's
plots and anything else that reads a run's metrics, and the reader of metrics.jsonl.

A new metric is one row here plus the code that produces its value. Names say their unit where they have one
(`_s` seconds, `_per_s` a rate, `_gib` GiB); the row's kind says over what the value is taken:
- window: over the optimizer steps since the previous log line (a mean or a rate);
- step: at the logged step itself;
- total: a running count or peak since the run started (resumes carry it on);
- setting: how the run is set up, logged for the record (text or a number that does not change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.run_folder import RunFolder

WINDOW, STEP, TOTAL, SETTING = "window", "step", "total", "setting"


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    name: str
    """The key in metrics.jsonl; a name ending in `/*` stands for a family (`samples_seen/<source>`)."""
    kind: str
    """window, step, total or setting (see the module docstring)."""
    unit: str
    """What the value counts, for axis labels ("" for a plain number)."""
    group: str
    """TensorBoard's section: the tag is `group/name` unless the name already starts with it."""
    label: str
    """How a plot's axis names it."""
    plot: str | None = None
    """The report figure that draws it (a key of PLOTS), or None."""
    colour: str = "tab:blue"
    """Its line's colour in that figure."""


METRICS: tuple[Metric, ...] = (
    Metric("loss", WINDOW, "", "train", "diffusion loss"),
    Metric("grad_norm", STEP, "", "train", "grad norm", plot="lr", colour="tab:gray"),
    Metric("lr", STEP, "", "train", "learning rate", plot="lr", colour="tab:orange"),
    Metric("samples_per_s", WINDOW, "samples/s", "train", "samples/s", plot="throughput", colour="tab:green"),
    Metric("tokens_per_s", WINDOW, "tokens/s", "train", "tokens/s", plot="throughput", colour="tab:purple"),
    Metric("tflops_per_gpu", WINDOW, "TFLOP/s", "train", "model TFLOP/s per GPU"),
    Metric("mfu", WINDOW, "", "train", "model FLOPs utilisation"),
    Metric("step_time_s", WINDOW, "s", "train", "seconds per step"),
    Metric("data_wait_s", WINDOW, "s", "train", "data wait per step"),
    Metric("peak_memory_gib", TOTAL, "GiB", "train", "peak memory (GiB)", plot="memory", colour="tab:red"),
    Metric("samples_seen", TOTAL, "samples", "train", "samples seen"),
    Metric("samples_seen/*", TOTAL, "samples", "train", "samples seen from a mixture's source"),
    Metric("bad_samples", TOTAL, "samples", "train", "bad samples skipped"),
    Metric("skipped_steps", TOTAL, "steps", "train", "steps skipped (non-finite loss)"),
    Metric("attention", SETTING, "", "train", "attention kernels"),
    Metric("sequence_parallel", SETTING, "ranks", "train", "sequence-parallel group size"),
    Metric("world_size", STEP, "ranks", "train", "ranks training (changes where an elastic run lost or gained nodes)"),
    Metric("eval/loss", STEP, "", "eval", "held-out loss"),
    Metric("eval/loss_t*", STEP, "", "eval", "held-out loss at one timestep"),
)

PLOTS: dict[str, tuple[str, str]] = {
    "throughput": ("throughput.png", "training throughput (all ranks)"),
    "memory": ("memory.png", "peak memory, rank 0 (GPU allocator peak / CPU peak RSS)"),
    "lr": ("lr.png", "learning rate and gradient norm (before clipping)"),
}
"""The report's panel figures: key -> (file name, title); the loss has a figure of its own."""

_BY_NAME = {metric.name: metric for metric in METRICS}


def metric(name: str) -> Metric:
    """The table's row for a logged name (a family's row for `samples_seen/<source>` or `eval/loss_t100`)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    for row in METRICS:
        if row.name.endswith("*") and name.startswith(row.name[:-1]) and name != row.name[:-1]:
            return row
    raise KeyError(f"metric {name!r} is not in cogvx_dist/core/metric_table.METRICS: add a row for it")


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a logged name: its group's section."""
    group = metric(name).group
    return name if name.startswith(group + "/") else f"{group}/{name}"


def plotted(plot: str) -> list[Metric]:
    """The rows a report figure draws, one panel each, in table order."""
    return [row for row in METRICS if row.plot == plot]


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (the last record wins for a step logged twice after a resume).

    A last line that is not valid JSON is skipped: the run is still writing it, or died while writing it. Any other
    bad line (undecodable, not a JSON object, no integer "step") raises CogvxError naming the file and line."""
    path = RunFolder(output_dir).metrics
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
            raise CogvxError(f"{path} line {index + 1}: not JSON ({err})") from err
        if not isinstance(record, dict):
            raise CogvxError(f"{path} line {index + 1}: expected a JSON object, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise CogvxError(f"{path} line {index + 1}: no integer \"step\" in the record")
        by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]
