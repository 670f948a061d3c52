"""Sampling videos with the diffusers pipeline, with or without a trained LoRA, and validation that watches a run.

Sampling runs in its own process, never on the training ranks: it is the only place besides data prep that loads
T5 and the VAE, so `cogvx sample --watch RUN_DIR` can sit on a spare GPU (or a CPU node) and validate each new
checkpoint while the DeepSpeed ranks keep their memory for the transformer.

Adapters load with `pipe.load_lora_weights(folder)`: the file's metadata carries lora_alpha, so diffusers applies
the adapter at its trained scale alpha / r without any scale argument here.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogvx_dist.core.errors import CogvxError, first_line
from cogvx_dist.core.files import write_atomic

log = logging.getLogger("cogvx.sample")

VALIDATION_DIR = "validation"
VALIDATION_RECORD = "validated.json"
"""JSON record of the checkpoint steps a watcher has already sampled, so that a restarted watcher skips them."""
DEFAULT_PROMPTS = ("a red square moves left", "a blue circle moves down")


@dataclass
class SampleSettings:
    """How to draw one clip; None means the checkpoint's default (frames, size) or family's (fps)."""

    num_inference_steps: int = 50
    """Denoising steps of the CogVideoX DPM scheduler."""
    guidance_scale: float = 6.0
    """Classifier-free guidance scale (the CogVideoX default); 1.0 disables guidance and halves the work."""
    seed: int = 0
    """Seed of the initial noise; the same seed with and without a LoRA isolates the adapter's effect."""
    frames: int | None = None
    """Frames per clip (8N+1 / 16N+1); default: the checkpoint's."""
    height: int | None = None
    """Pixel height; default: the checkpoint's."""
    width: int | None = None
    """Pixel width; default: the checkpoint's."""
    fps: int | None = None
    """Frame rate of the written mp4; default: the family's."""
    grid_columns: int = 0
    """Frames per row of the preview grid PNG (0: all frames in one row, up to 9)."""


def pick_device(device: str = "auto") -> str:
    """"auto" is the first GPU when torch sees one, else the CPU; anything else is passed through (checked)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CogvxError(f"--device {device}: no CUDA GPU is visible to torch on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise CogvxError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


def lora_folder(path: str | Path) -> Path:
    """The folder holding `pytorch_lora_weights.safetensors` (accepts the file itself), or a one-line error."""
    from cogvx_dist.core.lora import LORA_WEIGHTS_NAME

    path = Path(path)
    if path.is_file() and path.name.endswith(".safetensors"):
        if path.name != LORA_WEIGHTS_NAME:
            raise CogvxError(f"--lora {path}: expected a file named {LORA_WEIGHTS_NAME} (or its folder)")
        return path.parent
    if not path.exists():
        raise CogvxError(f"--lora {path} does not exist")
    if not (path / LORA_WEIGHTS_NAME).is_file():
        nested = path / "lora" / LORA_WEIGHTS_NAME  # a run folder or a checkpoint folder
        if nested.is_file():
            return nested.parent
        raise CogvxError(f"--lora {path}: no {LORA_WEIGHTS_NAME} there (pass an exported adapter folder or run dir)")
    return path


class Sampler:
    """A loaded pipeline that draws clips from prompts, with adapters swapped in and out between clips."""

    def __init__(self, model: str | Path, device: str = "auto", dtype: str = "auto",
                 allow_other_family: bool = False) -> None:
        import torch

        from cogvx_dist.core.loading import describe_checkpoint

        self.info = describe_checkpoint(model)
        self.family = self.info.family
        self.device = pick_device(device)
        if dtype == "auto":
            # bfloat16 is what CogVideoX runs in on GPUs; CPUs are exact and fast enough in float32 at tiny sizes.
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise CogvxError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
        self.dtype = getattr(torch, dtype)
        pipeline_class = self.family.pipeline_type()
        try:
            self.pipe = pipeline_class.from_pretrained(str(model), torch_dtype=self.dtype)
        except (OSError, ValueError) as err:
            raise CogvxError(f"cannot load the {self.family.pipeline_class} from {model}: {first_line(err)}") from None
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.lora: Path | None = None
        self.allow_other_family = allow_other_family

    def set_lora(self, lora: str | Path | None) -> None:
        """Apply the exported adapter at `lora` (at its trained alpha/r), or none; the previous one is removed."""
        if self.lora is not None:
            self.pipe.unload_lora_weights()
            self.lora = None
        if lora is None:
            return
        folder = lora_folder(lora)
        self._check_adapter_fits(folder)
        try:
            self.pipe.load_lora_weights(str(folder))
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            raise CogvxError(f"LoRA {folder} does not load into {self.info.source}: {first_line(err)}") from None
        self.lora = folder

    def _check_adapter_fits(self, folder: Path) -> None:
        """Every adapter matrix must match a layer of this transformer (a LoRA from another family does not)."""
        from cogvx_dist.core.lora import load_exported_lora

        try:
            exported = load_exported_lora(folder)
        except CogvxError:
            raise
        except Exception as err:  # corrupt or foreign safetensors: one line, not a traceback
            raise CogvxError(f"cannot read LoRA {folder}: {first_line(err)}") from None
        state, settings = exported.state, exported.settings
        trained_on = f" (trained on {exported.family})" if exported.family else ""
        modules = dict(self.pipe.transformer.named_modules())
        for name, tensor in state.items():
            base_name = name.split(".lora_A.")[0].split(".lora_B.")[0]
            layer = modules.get(base_name)
            if layer is None or not hasattr(layer, "weight"):
                raise CogvxError(f"LoRA {folder}{trained_on} targets {base_name}, which {self.family.name} "
                                 f"({self.info.source}) does not have: it was trained for another model")
            out_features, in_features = layer.weight.shape[:2]
            expected = (settings.rank, in_features) if ".lora_A." in name else (out_features, settings.rank)
            if tuple(tensor.shape) != expected:
                raise CogvxError(f"LoRA {folder}{trained_on}: {name} has shape {tuple(tensor.shape)}, this "
                                 f"{self.family.name} checkpoint needs {expected}: it was trained for another model")
        # Shapes fit. 5b, 5b-I2V and 1.5-5b adapters have the same shapes, so only the record tells them apart.
        if exported.family and exported.family != self.family.name and not self.allow_other_family:
            raise CogvxError(f"LoRA {folder} was trained on {exported.family}, but {self.info.source} is "
                             f"{self.family.name}; pass --allow-other-family to apply it anyway")

    def generate(self, prompt: str, settings: SampleSettings, image: str | Path | None = None) -> np.ndarray:
        """One clip as float32 [frames, height, width, 3] in [0, 1]."""
        import torch

        frames = settings.frames or self.info.frames
        if not self.family.is_valid_frame_count(frames):
            valid = [n for n in self.family.valid_frame_counts() if n <= frames + 16][:4]
            raise CogvxError(f"--frames {frames} is not valid for {self.family.name} (valid: {valid} ...)")
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "num_frames": frames,
            "height": settings.height or self.info.height,
            "width": settings.width or self.info.width,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            # The generator lives on the CPU so the same seed gives the same noise on any device.
            "generator": torch.Generator("cpu").manual_seed(settings.seed),
            "output_type": "np",
        }
        if self.family.image_to_video:
            if image is None:
                raise CogvxError(f"{self.family.name} is an image-to-video model: pass --image FIRST_FRAME.png")
            kwargs["image"] = _load_image(image, kwargs["height"], kwargs["width"])
        elif image is not None:
            raise CogvxError(f"--image given, but {self.family.name} is a text-to-video model")
        with torch.inference_mode():
            video = self.pipe(**kwargs).frames[0]
        return np.clip(np.asarray(video, dtype=np.float32), 0.0, 1.0)


def _load_image(path: str | Path, height: int, width: int) -> Any:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise CogvxError(f"--image {path} does not exist")
    try:
        return Image.open(path).convert("RGB").resize((width, height))
    except OSError as err:
        raise CogvxError(f"--image {path}: not a readable image ({first_line(err)})") from None


def frame_grid(frames: np.ndarray, columns: int = 0, pad: int = 2) -> Any:
    """A PIL image of the clip's frames in rows of `columns` (0: up to 9 per row), on a dark background."""
    from PIL import Image

    count, height, width = frames.shape[:3]
    columns = columns or min(count, 9)
    rows = -(-count // columns)
    canvas = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 24, np.uint8)
    pixels = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    for i, frame in enumerate(pixels):
        r, c = divmod(i, columns)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        canvas[y : y + height, x : x + width] = frame
    return Image.fromarray(canvas)


def save_clip(frames: np.ndarray, path: str | Path, fps: int, grid_columns: int = 0) -> tuple[Path, Path]:
    """Write the clip as an mp4 and a frame-grid PNG beside it (same stem); returns both paths."""
    from diffusers.utils import export_to_video

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise CogvxError(f"--out {path}: the clip is written as an mp4, name it *.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_to_video(list(frames), str(path), fps=fps)
    grid = path.with_name(path.stem + "_grid.png")
    frame_grid(frames, grid_columns).save(grid)
    return path, grid


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "prompt"


def read_prompts(prompts: Sequence[str], prompts_file: str | Path | None) -> list[str]:
    """Prompts given with --prompt (repeatable) plus one per non-empty line of --prompts-file."""
    found = [p for p in prompts if p.strip()]
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise CogvxError(f"--prompts-file {path} does not exist")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return found


# --------------------------------------------------------------------------------------------------------------
# Validation that watches a training run


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


@dataclass
class WatchResult:
    """What a watcher did."""

    validated: list[int] = field(default_factory=list)
    """Steps sampled in this call, in order."""
    skipped: list[int] = field(default_factory=list)
    """Steps whose checkpoint vanished (pruned by keep_last) before they could be sampled."""
    reason: str = ""
    """Why the watcher stopped."""


def run_model(run_dir: Path) -> str:
    """The checkpoint a run trained on, from its run_config.json."""
    config = run_dir / "run_config.json"
    if not config.is_file():
        raise CogvxError(f"{run_dir} has no run_config.json (not a training run folder yet?); pass --model")
    try:
        path = json.loads(config.read_text())["model"]["path"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CogvxError(f"{config}: no model.path to sample with ({type(err).__name__}: {first_line(err)}); "
                         "pass --model") from None
    if not isinstance(path, str) or not path:
        raise CogvxError(f"{config}: model.path is {path!r}, not a checkpoint path; pass --model")
    return path


def _load_record(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; starting a fresh record", path)
    return {"steps": {}}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    # `cogvx report` and other watchers read it while we write: fsync'd and renamed into place.
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def watch_run(
    run_dir: str | Path,
    prompts: Sequence[str],
    settings: SampleSettings,
    options: WatchOptions,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    image: str | Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
    allow_other_family: bool = False,
) -> WatchResult:
    """Sample `prompts` with each new committed checkpoint of `run_dir`; log to files and TensorBoard.

    `image` is the first frame for image-to-video families (the same for every prompt and checkpoint).
    """
    from torch.utils.tensorboard import SummaryWriter

    from cogvx_dist.train.checkpoints import LORA_SUBDIR, complete_checkpoints
    from cogvx_dist.train.loop import SUMMARY_FILE

    run = Path(run_dir)
    if not prompts:
        raise CogvxError("--watch needs prompts: --prompt TEXT (repeatable) or --prompts-file FILE")
    started = time.monotonic()
    # A watcher started beside the trainer (same batch job) may come up before the run folder exists: wait for it.
    while not run.is_dir():
        if options.once or (options.max_wait_s and time.monotonic() - started >= options.max_wait_s):
            raise CogvxError(f"--watch {run}: no such run folder")
        log.info("waiting for %s to appear", run)
        sleep(options.interval_s)
    out_root = run / VALIDATION_DIR
    out_root.mkdir(parents=True, exist_ok=True)
    record_path = out_root / VALIDATION_RECORD
    record = _load_record(record_path)
    result = WatchResult()
    sampler: Sampler | None = None
    writer: Any = None

    def ensure_loaded() -> Sampler:
        # The model is loaded lazily: a watcher started before the trainer wrote run_config.json just waits.
        nonlocal sampler, writer
        if sampler is None:
            sampler = Sampler(model or run_model(run), device=device, dtype=dtype,
                              allow_other_family=allow_other_family)
            writer = SummaryWriter(str(run / "tensorboard" / VALIDATION_DIR))
            log.info("validating %s with %s on %s: %d prompt(s), %d steps", run, sampler.info.source,
                     sampler.device, len(prompts), settings.num_inference_steps)
            if options.baseline and "base" not in record:
                record["base"] = _sample_prompts(sampler, prompts, settings, out_root / "base", writer, 0, "base",
                                                 image)
                _write_record(record_path, record)
        return sampler

    try:
        while True:
            model_known = model is not None or (run / "run_config.json").is_file()
            pending = [(s, p) for s, p in complete_checkpoints(run) if str(s) not in record["steps"]]
            for step, folder in pending if model_known else []:
                current = ensure_loaded()
                target = out_root / f"step-{step:08d}"
                # Copy the adapter first: keep_last may delete the checkpoint while we sample, and the copy
                # keeps the exact adapter that made these clips next to them.
                try:
                    shutil.copytree(folder / LORA_SUBDIR, target / LORA_SUBDIR, dirs_exist_ok=True)
                except (FileNotFoundError, shutil.Error):
                    log.warning("checkpoint step %d vanished before it could be validated (keep_last?)", step)
                    result.skipped.append(step)
                    continue
                current.set_lora(target / LORA_SUBDIR)
                entry = _sample_prompts(current, prompts, settings, target, writer, step, "lora", image)
                current.set_lora(None)
                record["steps"][str(step)] = entry
                _write_record(record_path, record)
                result.validated.append(step)
                log.info("validated step %d: %s", step, target)
                if options.stop_after and len(result.validated) >= options.stop_after:
                    result.reason = f"validated {len(result.validated)} checkpoint(s) (--stop-after)"
                    return result
            if options.once:
                result.reason = "every committed checkpoint is validated (--once)"
                return result
            finished = (run / SUMMARY_FILE).is_file()
            if options.until_done and finished and not [
                s for s, _ in complete_checkpoints(run) if str(s) not in record["steps"]
            ]:
                result.reason = "training finished and every committed checkpoint is validated"
                return result
            if options.max_wait_s and time.monotonic() - started >= options.max_wait_s:
                result.reason = f"--max-wait {options.max_wait_s:g} s reached"
                return result
            sleep(options.interval_s)
    finally:
        if writer is not None:
            writer.close()


def _sample_prompts(sampler: Sampler, prompts: Sequence[str], settings: SampleSettings, folder: Path,
                    writer: Any, step: int, tag: str, image: str | Path | None = None) -> dict[str, Any]:
    """Sample each prompt into `folder` (mp4 + grid PNG) and log the grids to TensorBoard at `step`."""
    fps = settings.fps or sampler.family.fps
    files = []
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        frames = sampler.generate(prompt, settings, image=image)
        clip, grid = save_clip(frames, folder / f"{i:02d}_{slug(prompt)}.mp4", fps, settings.grid_columns)
        files.append({"prompt": prompt, "mp4": clip.name, "grid": grid.name,
                      "mean_pixel": float(frames.mean())})
        if writer is not None:
            # add_video needs moviepy; the frame grid shows the same frames as one image.
            grid_pixels = np.asarray(frame_grid(frames, settings.grid_columns))
            writer.add_image(f"{VALIDATION_DIR}/{i:02d}_{tag}", grid_pixels, step, dataformats="HWC")
            writer.add_text(f"{VALIDATION_DIR}/{i:02d}_prompt", prompt, step)
    if writer is not None:
        writer.flush()
    return {"folder": folder.name, "clips": files, "seconds": round(time.perf_counter() - started, 3),
            "seed": settings.seed, "num_inference_steps": settings.num_inference_steps}
