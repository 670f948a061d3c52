"""`cogvx sample`: one clip with or without a trained LoRA, or `--watch RUN_DIR` validation of each checkpoint.

    cogvx sample --model M [--lora L] --prompt P --out clip.mp4   one clip (+ frame-grid PNG)
    cogvx sample --watch RUN_DIR --prompt P [--prompt P2 ...]     validate each new checkpoint of a run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cogvx_dist.core.errors import CogvxError

if TYPE_CHECKING:
    from cogvx_dist.results.sample import SampleSettings


def configure(sample: argparse.ArgumentParser, name: str = "sample") -> None:
    """Arguments and handler of `cogvx sample`."""
    sample.set_defaults(handler=run)
    sample.add_argument("--model", help="CogVideoX checkpoint (default with --watch: the run's model.path)")
    sample.add_argument("--lora", help="exported adapter: folder holding pytorch_lora_weights.safetensors, "
                                       "the file, or a run/checkpoint folder (its lora/)")
    sample.add_argument("--prompt", action="append", help="prompt (repeatable with --watch)")
    sample.add_argument("--prompts-file", help="file with one prompt per line (--watch)")
    sample.add_argument("--image", help="first frame for image-to-video families (with --watch: for every prompt)")
    sample.add_argument("--allow-other-family", action="store_true",
                        help="apply a LoRA trained on another family of the same shapes (e.g. 5b on 1.5-5b)")
    sample.add_argument("--out", help="output mp4 (default sample.mp4); a _grid.png preview goes beside it")
    sample.add_argument("--gif", action="store_true", help="also write an animated GIF preview")
    sample.add_argument("--inference-steps", type=int, default=50, help="denoising steps (default 50)")
    sample.add_argument("--guidance-scale", type=float, default=6.0, help="classifier-free guidance (default 6)")
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sample.add_argument("--frames", type=int, help="frames (default: the checkpoint's)")
    sample.add_argument("--height", type=int, help="pixel height (default: the checkpoint's)")
    sample.add_argument("--width", type=int, help="pixel width (default: the checkpoint's)")
    sample.add_argument("--fps", type=int, help="mp4 frame rate (default: the family's)")
    sample.add_argument("--grid-columns", type=int, default=0, help="frames per row of the preview grid")
    sample.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cpu, cuda or cuda:N")
    sample.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    watch = sample.add_argument_group("validation (--watch)")
    watch.add_argument("--watch", metavar="RUN_DIR", help="sample the prompts with each new committed checkpoint")
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    watch.add_argument("--once", action="store_true", help="validate what is committed now, then exit")
    watch.add_argument("--stop-after", type=int, default=0, help="exit after this many checkpoints")
    watch.add_argument("--max-wait", type=float, default=0.0, help="exit after this many seconds")
    watch.add_argument("--until-done", action=argparse.BooleanOptionalAction, default=True,
                       help="exit once train_summary.json exists and all checkpoints are validated (default on)")
    watch.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                       help="also sample the prompts once without a LoRA, into validation/base (default on)")
    watch.add_argument("--ema", action="store_true",
                       help="also sample each checkpoint's adapter average (lora_ema/, train.ema_decay) into its ema/")


def _sample_settings(args: argparse.Namespace):
    from cogvx_dist.results.sample import SampleSettings

    for option, value, least in (("--inference-steps", args.inference_steps, 1), ("--fps", args.fps, 1),
                                 ("--grid-columns", args.grid_columns, 0), ("--stop-after", args.stop_after, 0),
                                 ("--max-wait", args.max_wait, 0)):
        if value is not None and value < least:
            raise CogvxError(f"{option} must be at least {least}, got {value}")
    if args.interval <= 0:
        raise CogvxError(f"--interval must be positive, got {args.interval}")
    return SampleSettings(num_inference_steps=args.inference_steps, guidance_scale=args.guidance_scale,
                          seed=args.seed, frames=args.frames, height=args.height, width=args.width, fps=args.fps,
                          grid_columns=args.grid_columns)


def run(args: argparse.Namespace) -> int:
    from cogvx_dist.core.logs import quiet_libraries
    from cogvx_dist.results.sample import read_prompts

    quiet_libraries()
    if args.ema and not args.watch:
        raise CogvxError("--ema goes with --watch; for one clip pass the average as --lora RUN_DIR/lora_ema")
    prompts = read_prompts(args.prompt or [], args.prompts_file)
    settings = _sample_settings(args)
    return _watch(args, prompts, settings) if args.watch else _one_clip(args, prompts, settings)


def _watch(args: argparse.Namespace, prompts: list[str], settings) -> int:
    from cogvx_dist.results.watch import SamplerSpec, WatchOptions, watch_run

    if args.lora or args.out:
        raise CogvxError("--watch samples each checkpoint's own LoRA into RUN_DIR/validation; drop --lora and --out")
    options = WatchOptions(interval_s=args.interval, once=args.once, stop_after=args.stop_after,
                           max_wait_s=args.max_wait, until_done=args.until_done, baseline=args.baseline,
                           average=args.ema)
    spec = SamplerSpec(model=args.model, device=args.device, dtype=args.dtype, image=args.image,
                       allow_other_family=args.allow_other_family)
    result = watch_run(args.watch, prompts, settings, options, spec)
    print(f"validated steps {result.validated or 'none'}"
          + (f", skipped vanished {result.skipped}" if result.skipped else "")
          + f"; stopped: {result.reason}; files in {Path(args.watch) / 'validation'}")
    return 0


def _one_clip(args: argparse.Namespace, prompts: list[str], settings) -> int:
    from cogvx_dist.results.sample import Sampler, lora_folder, save_clip

    if not args.model:
        raise CogvxError("--model is required (a CogVideoX checkpoint folder or hub id), or use --watch RUN_DIR")
    if len(prompts) != 1:
        raise CogvxError(f"give exactly one prompt to sample one clip (got {len(prompts)}); --watch takes several")
    out = Path(args.out or "sample.mp4")
    if out.suffix.lower() != ".mp4":
        raise CogvxError(f"--out {out}: the clip is written as an mp4, name it *.mp4")
    lora = lora_folder(args.lora) if args.lora else None  # fail on a bad path before loading the model
    _check_clip_geometry(args.model, settings)
    sampler = Sampler(args.model, device=args.device, dtype=args.dtype, allow_other_family=args.allow_other_family)
    sampler.set_lora(lora)
    frames = sampler.generate(prompts[0], settings, image=args.image)
    fps = settings.fps or sampler.family.fps
    clip, grid = save_clip(frames, out, fps, settings.grid_columns)
    gif_note = ""
    if args.gif:
        _write_gif(frames, out.with_suffix(".gif"), fps)
        gif_note = f", {out.with_suffix('.gif')}"
    info = {"prompt": prompts[0], "model": sampler.info.source, "lora": str(lora) if lora else None,
            "frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
            "seed": settings.seed, "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale, "device": sampler.device}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    adapter = f" with LoRA {lora}" if lora else " without LoRA"
    print(f"wrote {clip} ({frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}){adapter}; "
          f"preview {grid}{gif_note}")
    return 0


def _check_clip_geometry(model: str, settings: SampleSettings) -> None:
    """Refuse a clip the model cannot draw from its configs alone, before minutes of loading a real checkpoint's
    weights (Sampler.geometry checks again, for --watch and library callers)."""
    from cogvx_dist.core.loading import describe_checkpoint

    info = describe_checkpoint(model)
    info.family.check_geometry(info.frames if settings.frames is None else settings.frames,
                               info.height if settings.height is None else settings.height,
                               info.width if settings.width is None else settings.width, info.transformer_config)


def _write_gif(frames, path: Path, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray((f * 255).round().astype("uint8")) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / max(fps, 1)), loop=0)
