"""Validation that watches a training run: `cogvx sample --watch RUN_DIR` samples the prompts with each newly
committed checkpoint, beside the run (a spare GPU or a CPU node), and logs the clips to files and TensorBoard.

A record in RUN/validation/validated.json says which steps are done, so a restarted watcher skips them. The model
is loaded lazily: a watcher started before the trainer wrote its run config just waits.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogvx_dist.core import run_folder
from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.results.sample import Sampler, SampleSettings, frame_grid, save_clip, slug

log = logging.getLogger("cogvx.sample")


@dataclass
class WatchOptions:
    """How `cogvx sample --watch` polls and when it stops."""

    interval_s: float = 30.0
    """Seconds between looks at the run's checkpoints folder."""
    once: bool = False
    """Sample every committed checkpoint not yet validated, then exit."""
    stop_after: int = 0
    """Exit after validating this many checkpoints (0: no limit)."""
    max_wait_s: float = 0.0
    """Exit after this many seconds in total (0: no limit)."""
    until_done: bool = True
    """Exit once train_summary.json exists and every committed checkpoint is validated."""
    baseline: bool = True
    """Also sample the prompts once without any adapter (validation/base/), for comparison."""
    average: bool = False
    """Also sample each checkpoint's moving average of the adapter (lora_ema/, train.ema_decay), into the step's
    ema/ folder."""


@dataclass
class WatchResult:
    """What a watcher did."""

    validated: list[int] = field(default_factory=list)
    """Steps sampled in this call, in order."""
    skipped: list[int] = field(default_factory=list)
    """Steps whose checkpoint vanished (pruned by keep_last) before they could be sampled."""
    reason: str = ""
    """Why the watcher stopped."""


@dataclass
class SamplerSpec:
    """Which model the watcher samples with, and how."""

    model: str | None = None
    """Checkpoint to sample with; None: the run's model.path."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    image: str | Path | None = None
    """First frame for image-to-video families (the same for every prompt and checkpoint)."""
    allow_other_family: bool = False
    """Apply adapters trained on another family of the same shapes."""


def run_model(run_dir: Path) -> str:
    """The checkpoint a run trained on, from its run_config.json."""
    config = RunFolder(run_dir).run_config
    if not config.is_file():
        raise CogvxError(f"{run_dir} has no {config.name} (not a training run folder yet?); pass --model")
    try:
        path = json.loads(config.read_text())["model"]["path"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CogvxError(f"{config}: no model.path to sample with ({type(err).__name__}: {first_line(err)}); "
                         "pass --model") from err
    if not isinstance(path, str) or not path:
        raise CogvxError(f"{config}: model.path is {path!r}, not a checkpoint path; pass --model")
    return path


def load_record(path: Path) -> dict[str, Any]:
    """The validation record (steps done, the baseline), or a fresh one."""
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a fresh record", path)
    return {"steps": {}}


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace the record whole: `cogvx report` and other watchers read it while we write."""
    write_atomic(path, json.dumps(record, indent=2) + "\n")


class Watcher:
    """Samples the prompts with each new committed checkpoint of a run until a stop condition holds."""

    def __init__(self, run_dir: str | Path, prompts: Sequence[str], settings: SampleSettings, options: WatchOptions,
                 spec: SamplerSpec | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        if not prompts:
            raise CogvxError("--watch needs prompts: --prompt TEXT (repeatable) or --prompts-file FILE")
        self.run = RunFolder(run_dir)
        self.prompts = list(prompts)
        self.settings = settings
        self.options = options
        self.spec = spec or SamplerSpec()
        self.sleep = sleep
        self.started = time.monotonic()
        self.result = WatchResult()
        self.sampler: Sampler | None = None
        self.writer: Any = None
        self.record: dict[str, Any] = {"steps": {}}

    def run_until_done(self) -> WatchResult:
        """Wait for the run folder, then validate checkpoints as they appear until a stop condition holds."""
        self._wait_for_run_folder()
        self.run.validation.mkdir(parents=True, exist_ok=True)
        self.record = load_record(self.run.validation_record)
        try:
            while not self._stop_reason():
                self.sleep(self.options.interval_s)
        finally:
            if self.writer is not None:
                self.writer.close()
        return self.result

    def _wait_for_run_folder(self) -> None:
        # A watcher started beside the trainer (same batch job) may come up before the run folder exists.
        while not self.run.root.is_dir():
            if self.options.once or self._out_of_time():
                raise CogvxError(f"--watch {self.run.root}: no such run folder")
            log.info("waiting for %s to appear", self.run.root)
            self.sleep(self.options.interval_s)

    def _stop_reason(self) -> str:
        """Validate what is pending; the reason to stop (also stored in the result), or "" to poll again."""
        for step, folder in self._pending():
            self._validate(step, folder)
            if self.options.stop_after and len(self.result.validated) >= self.options.stop_after:
                self.result.reason = f"validated {len(self.result.validated)} checkpoint(s) (--stop-after)"
                return self.result.reason
        if self.options.once:
            self.result.reason = "every committed checkpoint is validated (--once)"
        elif self.options.until_done and self.run.summary.is_file() and not self._pending():
            self.result.reason = "training finished and every committed checkpoint is validated"
        elif self._out_of_time():
            self.result.reason = f"--max-wait {self.options.max_wait_s:g} s reached"
        return self.result.reason

    def _pending(self) -> list[tuple[int, Path]]:
        if self.spec.model is None and not self.run.run_config.is_file():
            return []  # the trainer has not said which model it trains yet
        return [(s, p) for s, p in self.run.complete_checkpoints() if str(s) not in self.record["steps"]]

    def _out_of_time(self) -> bool:
        return bool(self.options.max_wait_s) and time.monotonic() - self.started >= self.options.max_wait_s

    def _validate(self, step: int, folder: Path) -> None:
        sampler = self._loaded_sampler()
        target = self.run.validation / run_folder.step_folder_name(step)
        # Copy the adapter first: keep_last may delete the checkpoint while we sample, and the copy keeps the exact
        # adapter that made these clips next to them.
        try:
            shutil.copytree(folder / run_folder.LORA, target / run_folder.LORA, dirs_exist_ok=True)
        except (FileNotFoundError, shutil.Error):
            log.warning("checkpoint step %d vanished before it could be validated (keep_last?)", step)
            self.result.skipped.append(step)
            return
        sampler.set_lora(target / run_folder.LORA)
        self.record["steps"][str(step)] = self._sample_prompts(target, step, "lora")
        if self.options.average:
            self.record["steps"][str(step)]["ema"] = self._sample_average(folder, target, step)
        sampler.set_lora(None)
        write_record(self.run.validation_record, self.record)
        self.result.validated.append(step)
        log.info("validated step %d: %s", step, target)

    def _sample_average(self, folder: Path, target: Path, step: int) -> dict[str, Any] | None:
        """The prompts with the checkpoint's adapter average, copied beside the clips like the adapter."""
        assert self.sampler is not None
        try:
            shutil.copytree(folder / run_folder.LORA_EMA, target / run_folder.LORA_EMA, dirs_exist_ok=True)
        except (FileNotFoundError, shutil.Error):
            log.warning("checkpoint step %d has no %s/ (was train.ema_decay set?)", step, run_folder.LORA_EMA)
            return None
        self.sampler.set_lora(target / run_folder.LORA_EMA)
        return self._sample_prompts(target / "ema", step, "ema")

    def _loaded_sampler(self) -> Sampler:
        if self.sampler is None:
            from torch.utils.tensorboard import SummaryWriter

            spec = self.spec
            self.sampler = Sampler(spec.model or run_model(self.run.root), device=spec.device, dtype=spec.dtype,
                                   allow_other_family=spec.allow_other_family, beside_training=True)
            self.sampler.geometry(self.settings)  # a clip size the family cannot draw fails before any output
            self.writer = SummaryWriter(str(self.run.tensorboard / run_folder.VALIDATION))
            log.info("validating %s with %s on %s: %d prompt(s), %d steps", self.run.root, self.sampler.info.source,
                     self.sampler.device, len(self.prompts), self.settings.num_inference_steps)
            if self.options.baseline and "base" not in self.record:
                self.record["base"] = self._sample_prompts(self.run.validation / "base", 0, "base")
                write_record(self.run.validation_record, self.record)
        return self.sampler

    def _sample_prompts(self, folder: Path, step: int, tag: str) -> dict[str, Any]:
        """Sample each prompt into `folder` (mp4 + grid PNG) and log the grids to TensorBoard at `step`."""
        assert self.sampler is not None
        settings, tensorboard = self.settings, self.writer
        fps = settings.fps or self.sampler.family.fps
        files = []
        started = time.perf_counter()
        for i, prompt in enumerate(self.prompts):
            frames = self.sampler.generate(prompt, settings, image=self.spec.image)
            clip, grid = save_clip(frames, folder / f"{i:02d}_{slug(prompt)}.mp4", fps, settings.grid_columns)
            files.append({"prompt": prompt, "mp4": clip.name, "grid": grid.name, "mean_pixel": float(frames.mean())})
            if tensorboard is not None:
                # add_video needs moviepy; the frame grid shows the same frames as one image.
                grid_pixels = np.asarray(frame_grid(frames, settings.grid_columns))
                tensorboard.add_image(f"{run_folder.VALIDATION}/{i:02d}_{tag}", grid_pixels, step, dataformats="HWC")
                tensorboard.add_text(f"{run_folder.VALIDATION}/{i:02d}_prompt", prompt, step)
        if tensorboard is not None:
            tensorboard.flush()
        return {"folder": folder.name, "clips": files, "seconds": round(time.perf_counter() - started, 3),
                "seed": settings.seed, "num_inference_steps": settings.num_inference_steps}


def watch_run(run_dir: str | Path, prompts: Sequence[str], settings: SampleSettings, options: WatchOptions,
              spec: SamplerSpec | None = None, sleep: Callable[[float], None] = time.sleep) -> WatchResult:
    """Validate each new committed checkpoint of `run_dir` with `prompts` until a stop condition of `options`."""
    return Watcher(run_dir, prompts, settings, options, spec, sleep).run_until_done()
