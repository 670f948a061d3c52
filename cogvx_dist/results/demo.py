"""`cogvx demo`: the whole system on an embedded default, in a few minutes on two CPU cores.

tiny checkpoint -> synthetic mp4 clips with captions -> prep with 2 processes -> DeepSpeed training on 2 ranks ->
exported LoRA -> validation of each checkpoint -> clips sampled with and without the LoRA -> report and summary.

Every stage runs the same code a real job runs: prep and training are the `cogvx prep` / `cogvx train` commands
started as subprocesses (so the demo also shows the command lines to use on a cluster), sampling is the diffusers
pipeline loading the exported adapter.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogvx_dist.core import shard_format
from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.lora import LORA_WEIGHTS_NAME
from cogvx_dist.core.run_folder import MODEL_CARD, RunFolder

DEMO_MARKER = ".cogvx-demo"
"""File marking a folder as a demo output, which a later `cogvx demo --out` may replace."""
DEMO_FAMILY = "CogVideoX-2b"


@dataclass
class DemoSettings:
    """Size of the demo; the defaults take a few minutes on 2 CPU cores."""

    out: Path = Path("demo_out")
    """Output folder (replaced if it holds an earlier demo)."""
    clips: int = 16
    """Synthetic captioned mp4 clips to make and encode."""
    steps: int = 40
    """Optimizer steps to train."""
    inference_steps: int = 10
    """Denoising steps per sampled clip."""
    lr: float = 2e-2
    """Peak learning rate (high, because a tiny random model must visibly learn in a few dozen steps)."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 8.0
    """LoRA alpha (scale alpha / rank)."""
    prep_processes: int = 2
    """Prep processes (each encodes a disjoint slice of the clips)."""
    train_ranks: int = 0
    """DeepSpeed ranks; 0: 2 on CPU, one per visible GPU (at most 2) on a GPU machine."""
    device: str = "auto"
    """auto (the GPU when there is one), cpu or cuda."""
    seed: int = 0
    """Seed of the tiny model, the clips, training and sampling noise."""
    prompt: str = ""
    """Prompt to sample; default: the caption of the first synthetic clip."""


@dataclass
class StageTime:
    """Wall time of one demo stage."""

    name: str
    seconds: float


@dataclass
class DemoResult:
    """What the demo measured and where it wrote it (also summary.json)."""

    out: str
    settings: dict[str, Any]
    device: str
    stages: list[StageTime] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


def _say(message: str) -> None:
    print(message, flush=True)


def _prepare_out(out: Path) -> None:
    """Create the output folder, replacing an earlier demo's; refuse to touch any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise CogvxError(f"--out {out} exists, is not empty and is not an earlier demo output; pick another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `cogvx demo`; a later `cogvx demo --out` here replaces this folder\n")


def _cogvx(*args: str) -> list[str]:
    """The command line of a cogvx subcommand in this Python environment."""
    return [sys.executable, "-m", "cogvx_dist", *args]


def _shown(command: list[str]) -> str:
    """A command as a user would type it (cogvx instead of python -m cogvx_dist)."""
    text = " ".join(command)
    return text.replace(f"{sys.executable} -m cogvx_dist", "cogvx")


def _run_logged(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run a subcommand with output to a log file; on failure, raise with the log's last lines."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as handle:
        rc = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise CogvxError(f"`{_shown(command)}` failed with exit code {rc}; log {log_path}:\n{tail}")


def _prep(model: Path, data: Path, shards: Path, processes: int, device: str, logs: Path,
          result: DemoResult) -> dict[str, Any]:
    """Run `cogvx prep` as `processes` parallel processes (ranks of one job), then make sure the manifest exists."""
    commands = [
        _cogvx("prep", "--model", str(model), "--data", str(data), "--out", str(shards), "--rank", str(r),
               "--world-size", str(processes), "--storage-dtype", "float32", "--device", device, "--no-progress")
        for r in range(processes)
    ]
    result.commands += [_shown(c) for c in commands]
    started = time.perf_counter()
    handles = []
    for rank, command in enumerate(commands):
        log = open(logs / f"prep-rank{rank}.log", "w")
        handles.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log, rank))
    failed = []
    for proc, log, rank in handles:
        if proc.wait() != 0:
            failed.append(rank)
        log.close()
    wall = time.perf_counter() - started
    if failed:
        tail = "\n".join((logs / f"prep-rank{failed[0]}.log").read_text().splitlines()[-15:])
        raise CogvxError(f"prep rank(s) {failed} failed; log {logs}/prep-rank{failed[0]}.log:\n{tail}")
    # The last process to finish merges the manifest; finalize covers the case where neither saw the other done.
    if not (shards / shard_format.MANIFEST_NAME).is_file():
        _run_logged(_cogvx("prep", "finalize", str(shards)), logs / "prep-finalize.log")
    return _prep_numbers(shards, processes, wall, logs)


def _prep_numbers(shards: Path, processes: int, wall: float, logs: Path) -> dict[str, Any]:
    """Prep's numbers from what prep wrote, not from its log text: the manifest, and each rank's progress file,
    whose "stats" hold the clips it encoded and its run time (start-up excluded)."""
    manifest = shard_format.Manifest.read(shards)
    per_rank = []
    for rank in range(processes):
        part = shard_format.read_part(shards, rank)
        stats = (part or {}).get("stats") or {}
        if "encoded" not in stats or "seconds" not in stats:
            raise CogvxError(f"prep rank {rank} left no encoding stats in {shards}/{shard_format.PARTS_DIR} "
                             f"(log {logs}/prep-rank{rank}.log)")
        encoded, seconds = int(stats["encoded"]), float(stats["seconds"])
        per_rank.append({"rank": rank, "encoded": encoded, "seconds": seconds,
                         "videos_per_s": round(encoded / seconds, 3) if seconds > 0 else 0.0})
    encoded_total = sum(r["encoded"] for r in per_rank)
    encode_seconds = max((r["seconds"] for r in per_rank), default=0.0)
    return {
        "processes": processes,
        "samples": manifest.num_samples or encoded_total,
        "shards": len(manifest.shards),
        "wall_s": round(wall, 2),
        "videos_per_s_wall": round(encoded_total / wall, 3) if wall else 0.0,
        # Encoding rate of the job: all encoded clips over the slowest process's run time (start-up excluded).
        "videos_per_s": round(encoded_total / encode_seconds, 3) if encode_seconds else 0.0,
        "per_rank": per_rank,
    }


def _train_config(path: Path, settings: DemoSettings, model: Path, shards: Path, run: Path, on_gpu: bool,
                  ranks: int) -> Path:
    import yaml

    checkpoint_every = max(1, settings.steps // 4)
    # 4 micro-batches per rank and step, fewer when the clips could not fill one global batch (a reduced demo).
    accumulation = max(1, min(4, settings.clips // ranks))
    config = {
        "output_dir": str(run),
        "model": {"path": str(model), "dtype": "bfloat16" if on_gpu else "float32"},
        "data": {"shards": str(shards)},
        "lora": {"rank": settings.rank, "alpha": settings.alpha},
        "optim": {"lr": settings.lr, "warmup_steps": max(1, settings.steps // 10), "schedule": "cosine",
                  "min_lr_ratio": 0.1},
        "train": {"max_steps": settings.steps, "micro_batch_size": 1, "grad_accum_steps": accumulation,
                  "seed": settings.seed},
        "deepspeed": {"config": "zero2"},
        "checkpoint": {"every_steps": checkpoint_every, "keep_last": 4},
        "log": {"progress_bar": False, "tensorboard": True},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


COMPARISON_ROWS = ("without LoRA", "with LoRA", "difference")
"""The comparison picture's rows, top to bottom."""
_CELL_TARGET_PX = 160
"""Frames are enlarged by a whole factor to at least this height: the tiny model's 32-pixel frames become readable."""
_AMPLIFY_STEPS = (1, 2, 4, 8, 16, 32, 64)
"""Factors the difference row may be amplified by: round numbers a reader can undo in their head."""
_HEAT_MAP = "magma"
_TITLE_PX, _TEXT_PX, _SMALL_PX = 30, 22, 18
"""Type sizes of the title, the row labels and subtitle, the frame labels and notes."""
_PAPER, _INK, _MUTED = (250, 250, 250), (20, 20, 20), (90, 90, 90)


@dataclass
class ComparisonLayout:
    """Where things are in the comparison picture, so a reader (or a test) need not guess from its pixels."""

    path: Path
    size: tuple[int, int]
    """(width, height) of the whole picture."""
    scale: int
    """Each frame pixel is drawn as a scale x scale block (nearest neighbour: no invented detail)."""
    cell: tuple[int, int]
    """(width, height) of one enlarged frame."""
    rows: list[str]
    """Row labels, top to bottom."""
    columns: list[str]
    """Column labels, left to right (frame index and time)."""
    origins: list[list[tuple[int, int]]]
    """(x, y) of the top-left pixel of each cell, by row then column."""
    amplify: int
    """The difference row shows |with - without| multiplied by this factor (clipped at the top of the colour scale)."""


def _amplification(difference: Any) -> int:
    """The smallest listed factor that lifts the difference's 99th percentile to at least half brightness: strong
    enough to see, small enough that most of it is not clipped."""
    import numpy as np

    high = float(np.percentile(difference, 99))
    for factor in _AMPLIFY_STEPS:
        if high * factor >= 0.5:
            return factor
    return _AMPLIFY_STEPS[-1]


@functools.cache
def _font(size: int) -> Any:
    """DejaVu Sans, which matplotlib ships, so the labels look the same on every machine (PIL's built-in bitmap font
    is 11 px and cannot be scaled before Pillow 10.1)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _wrapped(text: str, font: Any, width: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def comparison_png(without: Any, with_lora: Any, path: Path, *, title: str, subtitle: str = "",
                   fps: float = 0.0) -> ComparisonLayout:
    """A picture of the two clips frame by frame: without the LoRA, with it, and |with - without| amplified, each
    frame enlarged by nearest neighbour, labelled by row and by frame (index and time at `fps`), under a title.

    Only draws: numbers quoted in `subtitle` come from the caller's arrays, never from these enlarged pixels."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    frames, height, width = without.shape[:3]
    difference = np.abs(with_lora.astype(np.float32) - without.astype(np.float32)).mean(axis=-1)
    amplify = _amplification(difference)
    # The difference as a heat map (dark: equal, bright: different): small changes stand out more than in grey.
    heat = colormaps[_HEAT_MAP](np.clip(difference * amplify, 0.0, 1.0))[..., :3]
    scale = max(1, -(-_CELL_TARGET_PX // height))
    cell_w, cell_h = width * scale, height * scale
    gap, margin, label_w = max(4, scale), 24, 200
    grid_w = frames * cell_w + (frames - 1) * gap
    canvas_w = margin + label_w + grid_w + margin
    title_lines = _wrapped(title, _font(_TITLE_PX), canvas_w - 2 * margin)
    subtitle_lines = _wrapped(subtitle, _font(_TEXT_PX), canvas_w - 2 * margin) if subtitle else []
    grid_top = margin + _line(_TITLE_PX) * len(title_lines) + _line(_TEXT_PX) * len(subtitle_lines) + 14 + \
        _line(_SMALL_PX) * (2 if fps else 1) + 12
    canvas_h = grid_top + 3 * cell_h + 2 * gap + 48 + margin
    canvas = Image.new("RGB", (canvas_w, canvas_h), _PAPER)
    draw = ImageDraw.Draw(canvas)
    _draw_lines(draw, (margin, margin), [(line, _TITLE_PX, _INK) for line in title_lines] +
                [(line, _TEXT_PX, _MUTED) for line in subtitle_lines])

    left = margin + label_w
    origins = [[(left + c * (cell_w + gap), grid_top + r * (cell_h + gap)) for c in range(frames)] for r in range(3)]
    columns = [f"frame {i}" + (f"\n{i / fps:.3f} s" if fps else "") for i in range(frames)]
    for c, label in enumerate(columns):
        draw.multiline_text((origins[0][c][0] + cell_w // 2, grid_top - 6), label, font=_font(_SMALL_PX),
                            fill=_MUTED, anchor="md", align="center")
    notes = [[], [], ["|with − without|", f"amplified ×{amplify}"]]
    for r, clip in enumerate([without, with_lora, heat]):
        pixels = (np.clip(clip, 0, 1) * 255).round().astype(np.uint8)
        for c in range(frames):
            # Nearest neighbour keeps each generated pixel a sharp block: the picture shows what the model drew.
            canvas.paste(Image.fromarray(pixels[c]).resize((cell_w, cell_h), Image.Resampling.NEAREST), origins[r][c])
        # The row's name, vertically centred on its frames, with any notes smaller beneath it.
        lines = [(COMPARISON_ROWS[r], _TEXT_PX, _INK), *[(note, _SMALL_PX, _MUTED) for note in notes[r]]]
        block = sum(_line(size) for _, size, _ in lines)
        _draw_lines(draw, (margin, origins[r][0][1] + (cell_h - block) // 2), lines)
    _draw_legend(canvas, (left, grid_top + 3 * cell_h + 2 * gap + 16), min(360, grid_w), amplify)

    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return ComparisonLayout(path=path, size=canvas.size, scale=scale, cell=(cell_w, cell_h),
                            rows=list(COMPARISON_ROWS), columns=columns, origins=origins, amplify=amplify)


def _line(size: int) -> int:
    """Height of a line of text in `size`-pixel type, with leading."""
    return round(size * 1.3)


def _draw_lines(draw: Any, at: tuple[int, int], lines: list[tuple[str, int, tuple[int, int, int]]]) -> None:
    """(text, size, colour) lines one under the other from the top-left corner `at`."""
    x, y = at
    for text, size, colour in lines:
        draw.text((x, y), text, font=_font(size), fill=colour)
        y += _line(size)


def _draw_legend(canvas: Any, at: tuple[int, int], width: int, amplify: int) -> None:
    """The heat map's colours from "equal" to the point where the amplified difference saturates, in 0-255."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    x, y = at
    bar_h = 14
    ramp = colormaps[_HEAT_MAP](np.linspace(0.0, 1.0, width))[:, :3]
    canvas.paste(Image.fromarray((np.repeat(ramp[None], bar_h, axis=0) * 255).round().astype(np.uint8)), (x, y))
    draw, font = ImageDraw.Draw(canvas), _font(_SMALL_PX)
    draw.text((x - 8, y + bar_h // 2), "0", font=font, fill=_MUTED, anchor="rm")
    draw.text((x + width + 8, y + bar_h // 2), f"≥ {255 / amplify:.0f} of 255 (the difference ×{amplify} fills the "
              "scale)", font=font, fill=_MUTED, anchor="lm")


class Demo:
    """The demo's stages in order; each records its wall time, its paths, its numbers and the command to repeat it."""

    def __init__(self, settings: DemoSettings) -> None:
        import torch

        from cogvx_dist.core.devices import pick_device

        if settings.clips < 2:
            raise CogvxError("--clips must be at least 2 (one per prep process)")
        if settings.steps < 1 or settings.inference_steps < 1:
            raise CogvxError("--steps and --inference-steps must be at least 1")
        self.settings = settings
        self.device = pick_device(settings.device)
        self.on_gpu = self.device.startswith("cuda")
        self.ranks = settings.train_ranks or (max(1, min(2, torch.cuda.device_count())) if self.on_gpu else 2)
        self.out = settings.out.resolve()
        self.logs = self.out / "logs"
        self.result = DemoResult(out=str(self.out), device=self.device, settings={
            k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()})
        from cogvx_dist.results.sample import SampleSettings

        self.sample_settings = SampleSettings(num_inference_steps=settings.inference_steps, seed=settings.seed)

    def run(self) -> DemoResult:
        """Every stage; the measurements are also written to OUT/summary.json and OUT/summary.md."""
        started = time.perf_counter()
        _prepare_out(self.out)
        self.logs.mkdir()
        stages = [("tiny checkpoint", self.make_model), ("synthetic clips", self.make_clips), ("prep", self.prep),
                  ("train", self.train), ("validation", self.validate), ("sample", self.sample),
                  ("report", self.report)]
        for number, (name, stage) in enumerate(stages, start=1):
            _say(f"[demo] {number}/{len(stages)} {stage.__doc__} ...")
            stage_started = time.perf_counter()
            detail = stage()
            seconds = time.perf_counter() - stage_started
            self.result.stages.append(StageTime(name, round(seconds, 2)))
            _say(f"[demo]   {detail} ({seconds:.1f} s)")
        result = self.result
        result.numbers["total_s"] = round(time.perf_counter() - started, 1)
        (self.out / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(result))
        result.paths["summary"] = str(self.out / "summary.md")
        return result

    def make_model(self) -> str:
        """tiny CogVideoX-2b checkpoint"""
        from cogvx_dist.core.tiny import make_tiny_checkpoint

        self.model = make_tiny_checkpoint(self.out / "model", DEMO_FAMILY, seed=self.settings.seed)
        self.result.commands.append(f"cogvx make-tiny-model {self.model} --family {DEMO_FAMILY} "
                                    f"--seed {self.settings.seed}")
        self.result.paths["model"] = str(self.model)
        return f"wrote {self.model}"

    def make_clips(self) -> str:
        """synthetic captioned mp4 clips"""
        from cogvx_dist.core.synthetic_videos import make_synthetic_dataset

        # 48x72 keeps the tiny model's 2:3 aspect (32x48), so prep only scales; 16 frames at 8 fps cover 9 frames.
        dataset = make_synthetic_dataset(self.out / "data", count=self.settings.clips, frames=16, height=48,
                                         width=72, fps=8, seed=self.settings.seed, layout="folder")
        self.data = dataset.data
        self.prompt = self.settings.prompt or dataset.prompts[dataset.good[0]]
        self.result.paths["data"] = str(dataset.data)
        return f"{len(dataset.good)} clips in {dataset.data}, e.g. {dataset.good[0]}: {self.prompt!r}"

    def prep(self) -> str:
        """prep (T5 + VAE -> shards)"""
        self.shards = self.out / "shards"
        prep = _prep(self.model, self.data, self.shards, self.settings.prep_processes,
                     "cuda" if self.on_gpu else "cpu", self.logs, self.result)
        self.result.numbers["prep"] = prep
        self.result.paths["shards"] = str(self.shards)
        return (f"{prep['samples']} samples in {prep['shards']} shards, {prep['videos_per_s']:.2f} videos/s encoding "
                f"({prep['videos_per_s_wall']:.2f} videos/s with process start-up)")

    def train(self) -> str:
        """train with DeepSpeed ZeRO-2 (the trainer exports the LoRA at the end)"""
        from cogvx_dist.core.metric_table import read_metrics

        self.run_dir = RunFolder(self.out / "run")
        config = _train_config(self.out / "run.yaml", self.settings, self.model, self.shards, self.run_dir.root,
                               self.on_gpu, self.ranks)
        command = _cogvx("train", "--config", str(config), "--nproc", str(self.ranks))
        self.result.commands.append(_shown(command))
        _run_logged(command, self.logs / "train.log")
        self.records = read_metrics(self.run_dir.root)
        self.train_summary = json.loads(self.run_dir.summary.read_text())
        run = self.run_dir
        self.result.paths.update({"run": str(run.root), "run_config": str(config),
                                  "lora": str(run.lora / LORA_WEIGHTS_NAME),
                                  "model_card": str(run.lora / MODEL_CARD), "metrics": str(run.metrics),
                                  "tensorboard": str(run.tensorboard)})
        return (f"{len(self.records)} steps on {self.ranks} rank(s) ({self.device}), loss "
                f"{self.records[0]['loss']:.4f} -> {self.records[-1]['loss']:.4f}, LoRA exported to {run.lora}")

    def validate(self) -> str:
        """validate each checkpoint (cogvx sample --watch --once)"""
        from cogvx_dist.results.watch import SamplerSpec, WatchOptions, watch_run

        run = self.run_dir
        self.watched = watch_run(run.root, [self.prompt], self.sample_settings, WatchOptions(once=True),
                                 SamplerSpec(device=self.device))
        self.result.commands.append(f"cogvx sample --watch {run.root} --prompt {json.dumps(self.prompt)} --once "
                                    f"--inference-steps {self.settings.inference_steps}")
        self.result.paths["validation"] = str(run.validation)
        return f"sampled steps {self.watched.validated} into {run.validation}"

    def sample(self) -> str:
        """sample with and without the LoRA"""
        import numpy as np

        from cogvx_dist.results.sample import Sampler, save_clip

        settings, prompt = self.settings, self.prompt
        sampler = Sampler(self.model, device=self.device)
        without = sampler.generate(prompt, self.sample_settings)
        sampler.set_lora(self.run_dir.lora)
        with_lora = sampler.generate(prompt, self.sample_settings)
        samples = self.out / "samples"
        without_mp4, without_grid = save_clip(without, samples / "without_lora.mp4", sampler.family.fps)
        with_mp4, with_grid = save_clip(with_lora, samples / "with_lora.mp4", sampler.family.fps)
        difference = float(np.abs(with_lora - without).mean())
        comparison = comparison_png(
            without, with_lora, samples / "comparison.png", title=f"“{prompt}”", fps=sampler.family.fps,
            subtitle=f"seed {settings.seed} · {settings.inference_steps} denoising steps · tiny "
                     f"{DEMO_FAMILY} · LoRA rank {settings.rank}, alpha {settings.alpha:g}, trained "
                     f"{settings.steps} steps · mean |with − without| = {difference:.4f} "
                     f"({difference * 255:.2f} of 255)").path
        self.result.numbers["sample"] = {
            "prompt": prompt, "inference_steps": settings.inference_steps, "seed": settings.seed,
            "frames": int(without.shape[0]), "height": int(without.shape[1]), "width": int(without.shape[2]),
            "mean_abs_pixel_difference": round(difference, 5),
            "mean_abs_pixel_difference_0_255": round(difference * 255, 3),
            "clips_differ": difference > 1e-4,
        }
        self.result.commands.append(f"cogvx sample --model {self.model} --lora {self.run_dir.lora} --prompt "
                                    f"{json.dumps(prompt)} --inference-steps {settings.inference_steps} "
                                    f"--out {with_mp4}")
        self.result.paths.update({"without_lora": str(without_mp4), "with_lora": str(with_mp4),
                                  "without_lora_grid": str(without_grid), "with_lora_grid": str(with_grid),
                                  "comparison": str(comparison)})
        return f"mean |with - without| = {difference:.4f} ({difference * 255:.2f} of 255) -> {samples}"

    def report(self) -> str:
        """report"""
        from cogvx_dist.results.report import plot_loss, write_report

        run, records, summary = self.run_dir, self.records, self.train_summary
        report = write_report(run.root)
        loss_png = plot_loss(records, self.out / "loss_curve.png",
                             title=f"demo: LoRA training loss ({self.ranks} ranks, {self.settings.steps} steps)")
        self.result.commands.append(f"cogvx report {run.root}")
        self.result.paths.update({"loss_curve": str(loss_png), "report": str(run.report)})
        self.result.numbers["train"] = {
            "ranks": summary["world_size"], "zero_stage": summary["zero_stage"], "steps": len(records),
            "samples_seen": summary["samples_seen"], "loss_first_step": round(records[0]["loss"], 5),
            "loss_last_step": round(records[-1]["loss"], 5), "loss_first_fifth": round(report["loss_first"], 5),
            "loss_last_fifth": round(report["loss_last"], 5), "loss_falls": report["loss_falls"],
            "samples_per_s": round(report["samples_per_s"], 3), "tokens_per_s": round(report["tokens_per_s"], 1),
            "step_time_s": round(report["step_time_s"], 4), "peak_memory_gib": round(report["peak_memory_gib"], 3),
            "validated_steps": self.watched.validated,
        }
        return f"plots in {run.report}, loss curve {loss_png}"


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run every stage; returns the measurements (also written to OUT/summary.json and OUT/summary.md)."""
    return Demo(settings).run()


def summary_markdown(result: DemoResult) -> str:
    """The human summary: what ran, the numbers, where the files are, and the commands to repeat each stage."""
    prep, train, sample = result.numbers["prep"], result.numbers["train"], result.numbers["sample"]
    lines = [
        "# cogvx demo",
        "",
        f"Ran on **{result.device}** in {result.numbers['total_s']:.0f} s: tiny {DEMO_FAMILY} checkpoint -> "
        f"{result.settings['clips']} synthetic captioned mp4 clips -> prep with {prep['processes']} processes -> "
        f"DeepSpeed ZeRO-{train['zero_stage']} training on {train['ranks']} ranks -> exported LoRA -> "
        f"validation of checkpoints {train['validated_steps']} -> clips with and without the LoRA -> report.",
        "",
        "## Numbers",
        "",
        "| what | value |",
        "|---|---|",
        f"| prep | {prep['samples']} samples in {prep['shards']} shards; {prep['videos_per_s']:.2f} videos/s encoding, "
        f"{prep['videos_per_s_wall']:.2f} videos/s including process start-up ({prep['wall_s']:.1f} s) |",
        f"| train | {train['steps']} steps, {train['samples_seen']} samples; {train['samples_per_s']:.2f} samples/s, "
        f"{train['tokens_per_s']:,.0f} tokens/s, {train['step_time_s']:.3f} s/step |",
        f"| loss | first step {train['loss_first_step']:.4f} -> last step {train['loss_last_step']:.4f}; "
        f"mean of first fifth {train['loss_first_fifth']:.4f} -> last fifth {train['loss_last_fifth']:.4f} "
        f"({'falling' if train['loss_falls'] else 'NOT falling'}) |",
        f"| peak memory, rank 0 | {train['peak_memory_gib']:.2f} GiB "
        f"({'CUDA allocator peak' if result.device.startswith('cuda') else 'process peak RSS'}) |",
        f"| with vs without LoRA | mean abs pixel difference {sample['mean_abs_pixel_difference']:.4f} "
        f"({sample['mean_abs_pixel_difference_0_255']:.2f} of 255): "
        f"{'the clips differ' if sample['clips_differ'] else 'the clips are the same'} |",
        f"| sampling | {sample['frames']} frames {sample['height']}x{sample['width']}, "
        f"{sample['inference_steps']} steps, seed {sample['seed']}, prompt {sample['prompt']!r} |",
        "",
        "## Stages (wall time)",
        "",
        *[f"- {s.name}: {s.seconds:.1f} s" for s in result.stages],
        "",
        "## Files",
        "",
        *[f"- {name}: `{path}`" for name, path in result.paths.items()],
        "",
        "## The same stages by hand",
        "",
        "```",
        *result.commands,
        "```",
        "",
    ]
    return "\n".join(lines)
