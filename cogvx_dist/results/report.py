"""`cogvx report RUN_DIR`: loss, throughput, memory and learning-rate plots and a text summary from metrics.jsonl.

Everything is read from the files a run leaves behind (metrics.jsonl, train_summary.json, run_config.json,
validation/), so a report can be made while training runs, after it crashed, or on another machine.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.metric_table import PLOTS, plotted, read_metrics
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train import membership


@dataclass
class RunStats:
    """Numbers that describe a run at a glance."""

    steps: int
    """Optimizer steps logged."""
    last_step: int
    """Highest logged step."""
    loss_first: float
    """Mean loss of the first fifth of the logged steps (the raw loss of one step is too noisy to compare)."""
    loss_last: float
    """Mean loss of the last fifth of the logged steps."""
    loss_final: float
    """Raw loss of the last logged step."""
    loss_min: float
    """Lowest raw loss."""
    samples_per_s: float
    """Training samples per second over all ranks (all samples / all step time), the first (warm-up) step excluded
    when there are others."""
    tokens_per_s: float
    """Mean transformer tokens per second, likewise."""
    step_time_s: float
    """Mean seconds per optimizer step, likewise."""
    data_wait_fraction: float
    """Share of step time spent waiting for data (high values mean the reader, not the GPU, is the limit)."""
    peak_memory_gib: float
    """Largest peak memory of rank 0: the CUDA allocator's peak on GPUs, the process's peak RSS on CPU runs."""
    samples_seen: int
    """Samples consumed by the last logged step."""
    tflops_per_gpu: float = float("nan")
    """Model TFLOP/s per GPU (forward and backward, no recomputation), likewise; nan for runs that did not log it."""
    mfu: float | None = None
    """Model FLOPs utilisation against the GPU's peak; None on CPU or an unknown GPU."""

    @property
    def loss_falls(self) -> bool:
        """True when the late loss is below the early loss."""
        return self.loss_last < self.loss_first


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); weight defaults from the length."""
    if not values:
        return []
    if weight is None:
        # About a tenth of the run in the averaging window: visible trend, yet early steps still show.
        weight = min(0.95, max(0.5, 1.0 - 10.0 / max(len(values), 1)))
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1.0 - weight) * value
        norm = weight * norm + (1.0 - weight)
        out.append(average / norm)
    return out


def _time_weighted(records: list[dict[str, Any]], key: str) -> float:
    """Total work over total time (a plain mean of per-step rates overweights the fast steps)."""
    pairs = [(r.get(key), r.get("step_time_s")) for r in records]
    pairs = [(rate, t) for rate, t in pairs if rate is not None and t]
    if not pairs:
        return _mean([r.get(key) for r in records])
    return sum(rate * t for rate, t in pairs) / sum(t for _, t in pairs)


def run_stats(records: list[dict[str, Any]]) -> RunStats:
    """Summary numbers of metrics records (as `cogvx_dist.core.metric_table.read_metrics` returns them)."""
    if not records:
        raise CogvxError("no metrics records to summarise")
    losses = [r["loss"] for r in records]
    k = max(1, len(records) // 5)
    steady = records[1:] if len(records) > 1 else records
    step_time = _mean([r.get("step_time_s") for r in steady])
    wait = _mean([r.get("data_wait_s") for r in steady])
    return RunStats(
        steps=len(records),
        last_step=records[-1]["step"],
        loss_first=_mean(losses[:k]),
        loss_last=_mean(losses[-k:]),
        loss_final=losses[-1],
        loss_min=min(losses),
        samples_per_s=_time_weighted(steady, "samples_per_s"),
        tokens_per_s=_time_weighted(steady, "tokens_per_s"),
        step_time_s=step_time,
        data_wait_fraction=wait / step_time if step_time and math.isfinite(wait) else float("nan"),
        peak_memory_gib=max((r.get("peak_memory_gib") or 0.0) for r in records),
        samples_seen=int(records[-1].get("samples_seen") or 0),
        tflops_per_gpu=_time_weighted(steady, "tflops_per_gpu"),
        mfu=_time_weighted(steady, "mfu") if any(r.get("mfu") is not None for r in steady) else None,
    )


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "training loss",
              held_out: list[tuple[int, float]] = (), changes: list[dict[str, Any]] = ()) -> Path:
    """Raw per-step loss as points and its smoothed curve, against the optimizer step; the held-out loss
    ((step, loss) pairs) as a line on the same axes where the run evaluated one; each membership change of an
    elastic run (train/membership.py) as a vertical line where the new world size went on."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, "o", ms=3, alpha=0.35, color="tab:blue", label="loss per step")
    ax.plot(steps, smooth(losses), "-", lw=2.2, color="tab:blue", label="smoothed (EMA)")
    if held_out:
        ax.plot(*zip(*held_out), "-s", ms=4, lw=1.8, color="tab:orange",
                label="held-out loss (fixed timesteps and noise)")
    for number, change in enumerate(changes):
        ax.axvline(change["resumed_from_step"] + 0.5, color="tab:red", ls="--", lw=1.2, alpha=0.8,
                   label="world size changed (elastic restart)" if number == 0 else None)
        ax.annotate(f"{change['previous_world_size']}\u2192{change['world_size']} ranks, "
                    f"{change['steps_redone']} redone", (change["resumed_from_step"] + 0.5, 1.0),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7,
                    color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_panels(records: list[dict[str, Any]], path: Path, panels: list[tuple[str, str, str]], title: str) -> Path:
    """One panel per (metric key, label, colour), stacked, sharing the step axis.

    Stacked rather than twin axes: tokens/s is samples/s times a constant, so on twin axes one line hides the other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 + 1.6 * len(panels)), dpi=110, sharex=True,
                             squeeze=False)
    for ax, (key, label, colour) in zip(axes[:, 0], panels):
        values = [r.get(key) if r.get(key) is not None else float("nan") for r in records]
        ax.plot(steps, values, "-o", ms=2.5, lw=1.2, color=colour)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_text(stats: RunStats, run_dir: Path, extra: dict[str, Any]) -> str:
    """The plain-text summary written as report/summary.txt and printed by `cogvx report`."""
    lines = [
        f"run: {run_dir}",
        f"steps logged: {stats.steps} (last step {stats.last_step}, {stats.samples_seen} samples seen)",
        f"loss: {stats.loss_first:.4f} (mean of first fifth) -> {stats.loss_last:.4f} (mean of last fifth); "
        f"final {stats.loss_final:.4f}, min {stats.loss_min:.4f}  [{'falling' if stats.loss_falls else 'NOT falling'}]",
        f"throughput: {stats.samples_per_s:.2f} samples/s, {stats.tokens_per_s:,.0f} tokens/s, "
        f"{stats.step_time_s:.3f} s/step (first step excluded), data wait {stats.data_wait_fraction:.1%} of step time",
        f"peak memory (rank 0): {stats.peak_memory_gib:.2f} GiB (CUDA allocator peak on GPU, process peak RSS on CPU)",
    ]
    if math.isfinite(stats.tflops_per_gpu):
        utilisation = f", MFU {stats.mfu:.1%}" if stats.mfu is not None else " (no MFU: CPU or unknown GPU peak)"
        lines.insert(4, f"model FLOPs: {stats.tflops_per_gpu:.2f} TFLOP/s per GPU{utilisation}")
    if extra.get("eval_steps"):
        steps = extra["eval_steps"]
        lines.append(f"held-out loss: {extra['eval_loss_first']:.4f} (step {steps[0]}) -> "
                     f"{extra['eval_loss_last']:.4f} (step {steps[-1]}), {len(steps)} evaluations at fixed "
                     "timesteps and noise")
    if extra.get("world_size"):
        lines.append(f"ranks: {extra['world_size']}, ZeRO stage {extra.get('zero_stage')}, "
                     f"family {extra.get('family')}")
    for change in extra.get("membership_changes", []):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(change["time"]))
        lines.append(f"membership change at {when} UTC: {change['previous_world_size']} -> {change['world_size']} "
                     f"ranks, resumed from step {change['resumed_from_step']}, {change['steps_redone']} steps redone")
    if extra.get("validated_steps"):
        lines.append(f"validation samples for steps {extra['validated_steps']} in {RunFolder(run_dir).validation}")
    return "\n".join(lines) + "\n"


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file that a run wrote; CogvxError naming the file if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CogvxError(f"{path}: cannot read it as JSON ({first_line(err)})") from err
    if not isinstance(data, dict):
        raise CogvxError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the plots and the summary of a run into out_dir (default RUN_DIR/report); returns the summary dict."""
    folder = RunFolder(run_dir)
    run = folder.root
    if not run.is_dir():
        raise CogvxError(f"{run}: no such run folder")
    logged = read_metrics(run)  # bad lines raise CogvxError
    records = [r for r in logged if r.get("loss") is not None]
    if not records:
        raise CogvxError(f"{folder.metrics} is missing or holds no steps yet (has training logged a step?)")
    out = Path(out_dir) if out_dir else folder.report
    out.mkdir(parents=True, exist_ok=True)
    stats = run_stats(records)
    extra = _run_facts(folder)
    held_out = held_out_losses(logged)
    if held_out:
        extra.update(eval_loss_first=held_out[0][1], eval_loss_last=held_out[-1][1],
                     eval_steps=[step for step, _ in held_out])
    changes = membership.changes(run)
    if changes:
        extra["membership_changes"] = changes
    plots = write_plots(records, out, held_out, changes)
    text = summary_text(stats, run, extra)
    (out / "summary.txt").write_text(text)
    summary = {"run_dir": str(run), **asdict(stats), "loss_falls": stats.loss_falls, **extra,
               "plots": {name: str(path) for name, path in plots.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["text"] = text
    return summary


def _run_facts(folder: RunFolder) -> dict[str, Any]:
    """World size, ZeRO stage and family from the training summary, and the validated steps, where they exist."""
    extra: dict[str, Any] = {}
    if folder.summary.is_file():
        train_summary = _read_json_object(folder.summary)
        extra.update({k: train_summary.get(k) for k in ("world_size", "zero_stage", "family")})
    validated = folder.validation_record
    if validated.is_file():
        try:
            extra["validated_steps"] = sorted(int(s) for s in _read_json_object(validated).get("steps", {}))
        except (TypeError, ValueError, AttributeError) as err:
            raise CogvxError(f"{validated}: \"steps\" is not a map of step numbers ({first_line(err)})") from err
    return extra


def held_out_losses(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, held-out loss) of every step the run evaluated (log.eval_every_steps)."""
    from cogvx_dist.train.evaluation import EVAL_KEY

    return [(r["step"], r[EVAL_KEY]) for r in records if r.get(EVAL_KEY) is not None]


def write_plots(records: list[dict[str, Any]], out: Path, held_out: list[tuple[int, float]] = (),
                changes: list[dict[str, Any]] = ()) -> dict[str, Path]:
    """The loss plot (with the membership changes `changes`) and each panel figure of the metric table
    (throughput, memory, learning rate) as PNGs in `out`."""
    plots = {"loss": plot_loss(records, out / "loss.png", held_out=held_out, changes=changes)}
    for key, (file_name, title) in PLOTS.items():
        panels = [(row.name, row.label, row.colour) for row in plotted(key)]
        plots[key] = _plot_panels(records, out / file_name, panels, title)
    return plots
