"""Sampling videos with the diffusers pipeline, with or without a trained LoRA.

Sampling runs in its own process, never on the training ranks: it is the only place besides data prep that loads
T5 and the VAE, so validation (results/watch.py) can sit on a spare GPU (or a CPU node) while the DeepSpeed ranks
keep their memory for the transformer.

Adapters load with `pipe.load_lora_weights(folder)`: the file's metadata carries lora_alpha, so diffusers applies
the adapter at its trained scale alpha / r without any scale argument here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cogvx_dist.core import run_folder
from cogvx_dist.core.devices import compute_dtype, pick_device
from cogvx_dist.core.errors import CogvxError, first_line


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
        nested = path / run_folder.LORA / LORA_WEIGHTS_NAME  # a run folder or a checkpoint folder
        if nested.is_file():
            return nested.parent
        raise CogvxError(f"--lora {path}: no {LORA_WEIGHTS_NAME} there (pass an exported adapter folder or run dir)")
    return path


class Sampler:
    """A loaded pipeline that draws clips from prompts, with adapters swapped in and out between clips."""

    def __init__(self, model: str | Path, device: str = "auto", dtype: str = "auto",
                 allow_other_family: bool = False, beside_training: bool = False) -> None:
        from cogvx_dist.core.loading import describe_checkpoint

        self.info = describe_checkpoint(model)
        self.family = self.info.family
        self.device = pick_device(device, beside_training=beside_training)
        self.dtype = compute_dtype(dtype, self.device)
        pipeline_class = self.family.pipeline_type()
        try:
            self.pipe = pipeline_class.from_pretrained(str(model), torch_dtype=self.dtype)
        except (OSError, ValueError) as err:
            raise CogvxError(f"cannot load the {self.family.pipeline_class} from {model}: {first_line(err)}") from err
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
            raise CogvxError(f"LoRA {folder} does not load into {self.info.source}: {first_line(err)}") from err
        self.lora = folder

    def _check_adapter_fits(self, folder: Path) -> None:
        """Every adapter matrix must match a layer of this transformer (a LoRA from another family does not)."""
        from cogvx_dist.core.lora import adapter_misfit, load_exported_lora

        try:
            exported = load_exported_lora(folder)
        except CogvxError:
            raise
        except Exception as err:  # corrupt or foreign safetensors: one line, not a traceback
            raise CogvxError(f"cannot read LoRA {folder}: {first_line(err)}") from err
        trained_on = f" (trained on {exported.family})" if exported.family else ""
        misfit = adapter_misfit(exported.state, exported.settings.rank, self.pipe.transformer)
        if misfit:
            raise CogvxError(f"LoRA {folder}{trained_on} {misfit} ({self.family.name}, {self.info.source}): it was "
                             "trained for another model")
        # Shapes fit. 5b, 5b-I2V and 1.5-5b adapters have the same shapes, so only the record tells them apart.
        if exported.family and exported.family != self.family.name and not self.allow_other_family:
            raise CogvxError(f"LoRA {folder} was trained on {exported.family}, but {self.info.source} is "
                             f"{self.family.name}; pass --allow-other-family to apply it anyway")

    def geometry(self, settings: SampleSettings) -> tuple[int, int, int]:
        """(frames, height, width) of the clips `settings` ask for, or a one-line error where the family cannot
        draw them (diffusers would fail deep inside the transformer instead)."""
        frames, height, width = (self.info.frames if settings.frames is None else settings.frames,
                                 self.info.height if settings.height is None else settings.height,
                                 self.info.width if settings.width is None else settings.width)
        self.family.check_geometry(frames, height, width, self.info.transformer_config)
        return frames, height, width

    def generate(self, prompt: str, settings: SampleSettings, image: str | Path | None = None) -> np.ndarray:
        """One clip as float32 [frames, height, width, 3] in [0, 1]."""
        import torch

        frames, height, width = self.geometry(settings)
        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "num_frames": frames,
            "height": height,
            "width": width,
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
        raise CogvxError(f"--image {path}: not a readable image ({first_line(err)})") from err


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
