"""Training metrics as a run produces them: the throughput window between log lines, metrics.jsonl, TensorBoard and
the other trackers (rank 0), and the per-rank sample trace. What each metric is, and reading them back:
core/metric_table.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from cogvx_dist.core.config_files import to_dict
from cogvx_dist.core.metric_table import metric, tensorboard_tag
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.trackers import Tracker, TrackerFeed, open_trackers


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepMeter:
    """Loss, step time and data wait over the optimizer steps since the last log line.

    Losses stay tensors until a log step reads them: reading one forces the host to wait for the device.
    """

    def __init__(self, global_batch: int, device: torch.device, world_size: int = 1,
                 peak_flops: float | None = None) -> None:
        self.global_batch = global_batch
        self.device = device
        self.world_size = world_size
        self.peak_flops = peak_flops
        """One GPU's peak FLOP/s; None: no MFU."""
        self._reset()

    def _reset(self) -> None:
        self.started = time.perf_counter()
        self.data_wait = 0.0
        self.steps = self.loss_steps = 0
        self.loss_sum: torch.Tensor | float = 0.0
        self.tokens = self.flops = 0.0
        self.samples: float | None = 0.0
        """Samples trained over all ranks; None once a step came without its count (then the global batch counts)."""

    def next_batch(self, loader: Any) -> Any:
        """The loader's next micro-batch, its wait counted as data wait."""
        started = time.perf_counter()
        batch = next(loader)
        self.data_wait += time.perf_counter() - started
        return batch

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of other work (the held-out evaluation) out of the window's step time."""
        self.started += seconds

    def step_done(self, loss: torch.Tensor | None, tokens: float = 0.0, flops: float = 0.0,
                  samples: float | None = None) -> None:
        """An optimizer step ended with this (all-ranks mean) loss, None for a step skipped as non-finite, having
        trained `samples` samples (None: the global batch; a token budget makes it vary), `tokens` tokens and
        `flops` model FLOPs over all ranks (each sample counted at its own size)."""
        self.steps += 1
        self.tokens += tokens
        self.flops += flops
        self.samples = None if samples is None or self.samples is None else self.samples + samples
        if loss is not None:
            self.loss_steps += 1
            self.loss_sum = self.loss_sum + loss

    def values(self, lr: float, grad_norm: float | None, samples_seen: int) -> dict[str, Any]:
        """The metrics of the window, which then starts again."""
        elapsed = time.perf_counter() - self.started
        samples = self.steps * self.global_batch if self.samples is None else self.samples
        samples_per_s = samples / elapsed
        values = {
            "loss": float(self.loss_sum) / self.loss_steps if self.loss_steps else None,
            "grad_norm": grad_norm,
            "lr": lr,
            "samples_per_s": samples_per_s,
            "tokens_per_s": self.tokens / elapsed,
            "tflops_per_gpu": self.flops / elapsed / self.world_size / 1e12,
            "step_time_s": elapsed / self.steps,
            "data_wait_s": self.data_wait / self.steps,
            "peak_memory_gib": peak_memory_bytes(self.device) / 2**30,
            "samples_seen": samples_seen,
        }
        values["mfu"] = values["tflops_per_gpu"] * 1e12 / self.peak_flops if self.peak_flops else None
        self._reset()
        return values


class MetricsWriter:
    """Appends one JSON object per logged step to output_dir/metrics.jsonl, mirrored to TensorBoard and the other
    trackers of log.trackers (train/trackers.py) under the same TensorBoard tags."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool, resume_step: int = 0,
                 trackers: list[Tracker] | None = None) -> None:
        run = RunFolder(output_dir)
        self.enabled = enabled
        self.path = run.metrics
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the events an earlier run logged after the step this run resumes from.
            self._tb = SummaryWriter(str(run.tensorboard), purge_step=resume_step + 1 if resume_step else None)
        self._feed = TrackerFeed(trackers) if enabled and trackers else None

    @classmethod
    def for_run(cls, config: RunConfig, enabled: bool, resume_step: int = 0) -> MetricsWriter:
        """The writer of a training run: log.trackers opened (on the rank that writes, `enabled`), the run config
        given to each as its config."""
        names = config.log.tracker_names()
        trackers = open_trackers(config.output_dir, config.log, to_dict(config), resume_step) if enabled else []
        return cls(config.output_dir, enabled, "tensorboard" in names, resume_step, trackers)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record `values` for optimizer step `step` (every name must have its row in the metric table)."""
        for name in values:
            metric(name)
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        scalars = {tensorboard_tag(name): value for name, value in values.items() if isinstance(value, (int, float))}
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
        if self._feed is not None:
            texts = {tensorboard_tag(name): value for name, value in values.items() if isinstance(value, str)}
            self._feed.log(step, scalars, texts)

    def close(self) -> None:
        """Flush and close TensorBoard; the trackers take the last steps and end their runs."""
        if self._tb is not None:
            self._tb.close()
        if self._feed is not None:
            self._feed.close()
            self._feed = None


class SampleTrace:
    """Each rank's sample keys per micro-step (log.sample_trace), one JSON line each, written as they happen."""

    def __init__(self, output_dir: str | Path, rank: int) -> None:
        path = RunFolder(output_dir).trace_file(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # line-buffered: lines survive a crash

    def write(self, step: int, micro_step: int, keys: list[str]) -> None:
        self._file.write(json.dumps({"step": step, "micro_step": micro_step, "keys": keys}) + "\n")

    def close(self) -> None:
        self._file.close()
