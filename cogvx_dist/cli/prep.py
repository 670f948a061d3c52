"""`cogvx prep`: encode videos and prompts into latent shards (the prep tier, data_prep/).

    cogvx prep --model M --data ROOT --out DIR [options]   encode (this process's slice; resumes)
    cogvx prep finalize DIR                                merge per-rank progress into manifest.json
"""

from __future__ import annotations

import argparse
import sys

from cogvx_dist.core.caption_layouts import (
    COGVIDEO_CAPTIONS,
    COGVIDEO_IMAGES,
    COGVIDEO_VIDEOS,
    describe_layouts,
    layout_choices,
)


def configure(prep: argparse.ArgumentParser, name: str = "prep") -> None:
    """Arguments and handler of `cogvx prep`."""
    prep.set_defaults(handler=run)
    prep.add_argument("action", nargs="?", choices=("run", "finalize"), default="run",
                      help="run (default): encode this process's slice; finalize DIR: merge the manifest")
    prep.add_argument("folder", nargs="?", help="output folder (for finalize)")
    prep.add_argument("--config", help="YAML file of prep settings (keys as in PrepConfig); flags override it")
    prep.add_argument("--model", help="CogVideoX checkpoint (diffusers folder or hub id)")
    prep.add_argument("--model-id", dest="model_id", help="model name to record in the manifest (default: --model)")
    prep.add_argument("--data", help="dataset folder, or a CSV/JSONL file with video and prompt columns")
    prep.add_argument("--out", help="output folder for shards and manifest.json, or an s3:// or gs:// URL")
    prep.add_argument("--prompt-prefix", dest="prompt_prefix", help='text before every caption, e.g. "<sks> "')
    prep.add_argument("--prompt-template", dest="prompt_template",
                      help='what T5 encodes, with {prompt} for the caption, e.g. "{prompt}, in the style of <sks>"')
    prep.add_argument("--image-noise-samples", type=int, dest="image_noise_samples",
                      help="image-to-video: noised copies of each conditioning frame (official I2V recipe; "
                           "default 4, 0: none)")
    prep.add_argument("--stage", help="with an output URL: local folder for shards before upload")
    # argparse %-formats help strings: a % in a layout's description would otherwise break --help.
    prep.add_argument("--layout", choices=layout_choices(),
                      help="input layout (default auto). " + describe_layouts().replace("%", "%%"))
    prep.add_argument("--caption-file", dest="caption_file",
                      help=f"CogVideo layout: caption list in --data (default: {' or '.join(COGVIDEO_CAPTIONS)})")
    prep.add_argument("--video-file", dest="video_file",
                      help=f"CogVideo layout: video list (default: {COGVIDEO_VIDEOS})")
    prep.add_argument("--image-file", dest="image_file",
                      help=f"CogVideo layout: image list (default: {COGVIDEO_IMAGES})")
    prep.add_argument("--frames", action="append", metavar="N[,N...]",
                      help="frames per clip (valid for the family: 8N+1 / 16N+1); several (repeated, or 49,25) are "
                           "frame buckets: each clip goes to the longest it fills")
    prep.add_argument("--clips-per-video", type=int, dest="clips_per_video",
                      help="up to N non-overlapping clips from each long video, spread evenly (default 1: one clip "
                           "from the start)")
    prep.add_argument("--resolution", action="append", dest="resolutions", metavar="HxW",
                      help="resolution bucket, repeatable (e.g. --resolution 480x720 --resolution 720x480)")
    rate = prep.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=float, dest="target_fps", help="sample frames at this rate (default: family fps)")
    rate.add_argument("--frame-stride", type=int, dest="frame_stride", help="take every Nth source frame")
    prep.add_argument("--storage-dtype", dest="storage_dtype", choices=("bfloat16", "float16", "float32"))
    prep.add_argument("--compute-dtype", dest="compute_dtype", choices=("auto", "float32", "bfloat16"))
    prep.add_argument("--device", help="auto, cpu, cuda or cuda:N (auto: this process's GPU, else CPU)")
    prep.add_argument("--text-batch-size", type=int, dest="text_batch_size")
    prep.add_argument("--vae-batch-size", type=int, dest="vae_batch_size")
    prep.add_argument("--vae-slicing", action=argparse.BooleanOptionalAction, dest="vae_slicing")
    prep.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, dest="vae_tiling")
    prep.add_argument("--vae-channels-last", action=argparse.BooleanOptionalAction, dest="vae_channels_last",
                      help="channels-last (NDHWC) VAE weights and input (GPU speed; same moments up to rounding)")
    prep.add_argument("--vae-compile", action=argparse.BooleanOptionalAction, dest="vae_compile",
                      help="torch.compile the VAE encoder (about a minute per process and clip size)")
    prep.add_argument("--decode-workers", type=int, dest="decode_workers")
    prep.add_argument("--text-chunk", type=int, dest="text_chunk", help="records per T5-then-VAE round")
    prep.add_argument("--shard-size", dest="shard_max_bytes", help="target shard size, e.g. 512MiB or 1GB")
    prep.add_argument("--shard-samples", type=int, dest="shard_max_samples", help="most samples per shard")
    prep.add_argument("--max-failed-fraction", type=float, dest="max_failed_fraction",
                      help="exit 1 when more than this fraction of inputs fail (default 0.1)")
    prep.add_argument("--rank", type=int, help="this process's rank (overrides MPI/env discovery)")
    prep.add_argument("--world-size", type=int, dest="world_size", help="number of prep processes")
    prep.add_argument("--no-progress", action="store_false", dest="progress", default=None,
                      help="no progress bar")


_FIELDS = ("model", "model_id", "data", "out", "stage", "prompt_prefix", "prompt_template", "image_noise_samples",
           "layout", "caption_file", "video_file", "image_file", "frames", "clips_per_video", "target_fps",
           "frame_stride",
           "storage_dtype", "compute_dtype", "device", "text_batch_size", "vae_batch_size", "vae_slicing",
           "vae_tiling", "vae_channels_last", "vae_compile", "decode_workers", "text_chunk", "shard_max_bytes",
           "shard_max_samples", "max_failed_fraction", "rank", "world_size", "progress")


def config_from_args(args: argparse.Namespace):
    """PrepConfig from --config YAML (if any) with the given flags on top."""
    from cogvx_dist.core.units import parse_bytes, parse_size
    from data_prep.config import PrepConfig, parse_frame_counts

    config = PrepConfig.from_yaml(args.config) if args.config else PrepConfig()
    overrides = {name: getattr(args, name) for name in _FIELDS}
    if overrides["shard_max_bytes"] is not None:
        overrides["shard_max_bytes"] = parse_bytes(overrides["shard_max_bytes"], "--shard-size")
    if overrides["frames"] is not None:
        counts = parse_frame_counts(overrides["frames"])
        overrides["frames"] = counts[0] if len(counts) == 1 else counts
    if args.resolutions:
        overrides["buckets"] = [parse_size(r, "--resolution") for r in args.resolutions]
    if overrides["target_fps"] is not None or overrides["frame_stride"] is not None:
        # A flag for one sampling mode replaces the other mode given in the YAML file.
        config = _clear_rate(config)
    return config.replace(**overrides)


def _clear_rate(config):
    import dataclasses

    return dataclasses.replace(config, target_fps=None, frame_stride=None)


def run(args: argparse.Namespace) -> int:
    from cogvx_dist.core.errors import CogvxError

    if args.action == "finalize":
        return _finalize(args)
    if args.folder:
        raise CogvxError(f"unexpected argument {args.folder!r} (the output folder is --out)")
    config = config_from_args(args)
    config.check_basic()

    from cogvx_dist.core.devices import share_cpu_cores
    from data_prep.job import run_prep
    from data_prep.ranks import discover_ranks

    ranks = discover_ranks(config.rank, config.world_size)
    share_cpu_cores()
    try:
        result = run_prep(config, ranks)
    except BaseException as err:
        if ranks.comm is not None and ranks.world_size > 1 and not isinstance(err, CogvxError):
            # One failed MPI rank would leave the others waiting at the final barrier forever.
            print(f"[rank {ranks.rank}] prep failed: {err!r}; aborting the MPI job", file=sys.stderr, flush=True)
            ranks.comm.Abort(1)
        raise
    return result.exit_code


def _finalize(args: argparse.Namespace) -> int:
    """`cogvx prep finalize DIR`: merge the ranks' progress into the manifest; 1 when too many inputs failed."""
    from pathlib import Path

    from cogvx_dist.core.errors import CogvxError
    from data_prep.job import finalize_line
    from data_prep.shards import crop_line, finalize

    folder = args.folder or args.out
    if not folder:
        raise CogvxError("prep finalize needs the output folder: cogvx prep finalize DIR")
    manifest, inputs = finalize(folder)
    print(finalize_line(Path(folder), manifest, inputs))
    cropped = crop_line(manifest)
    if cropped:
        print(f"warning: {cropped}", file=sys.stderr)
    # The job's own limit (recorded by its ranks) unless the flag overrides it.
    limit = args.max_failed_fraction
    if limit is None:
        limit = float(manifest.extra.get("prep", {}).get("max_failed_fraction", 0.1))
    if inputs and manifest.skipped / inputs > limit:
        print(f"{manifest.skipped} of {inputs} inputs failed, more than max_failed_fraction {limit:g}",
              file=sys.stderr)
        return 1
    return 0
