"""`cogvx families`, `cogvx info MODEL` and `cogvx make-tiny-model OUT`: what the family table knows."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    """Arguments and handler of one of the model commands."""
    from cogvx_dist.core.families import FAMILIES

    if name == "make-tiny-model":
        parser.add_argument("out", help="output folder (diffusers layout)")
        parser.add_argument("--family", default="CogVideoX-2b", metavar="FAMILY",
                            help=f"model family, any case, or its hub id ({', '.join(FAMILIES)})")
        parser.add_argument("--seed", type=int, default=0, help="seed for all random weights and the tokenizer")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
        parser.set_defaults(handler=make_tiny_model)
    elif name == "info":
        parser.add_argument("model", help="diffusers-format folder or hub id")
        parser.set_defaults(handler=info)
    else:
        parser.set_defaults(handler=families)


def make_tiny_model(args: argparse.Namespace) -> int:
    from cogvx_dist.core.families import get_family
    from cogvx_dist.core.tiny import make_tiny_checkpoint

    family = get_family(args.family).name
    out = make_tiny_checkpoint(args.out, family, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {family} checkpoint (seed {args.seed}) to {out}")
    return 0


def info(args: argparse.Namespace) -> int:
    from cogvx_dist.core.loading import describe_checkpoint

    checkpoint = describe_checkpoint(args.model)
    family = checkpoint.family
    summary = {
        "source": checkpoint.source,
        "family": family.name,
        "pipeline": family.pipeline_class,
        "frames": checkpoint.frames,
        "height": checkpoint.height,
        "width": checkpoint.width,
        "fps": family.fps,
        "valid_frame_counts": family.valid_frame_counts(),
        "vae_scaling_factor": family.vae_scaling_factor,
        "invert_scale_latents": family.invert_scale_latents,
        "snr_shift_scale": family.snr_shift_scale,
        "rotary_positional_embeddings": family.use_rotary_positional_embeddings,
        "patch_size_t": family.patch_size_t,
        "ofs_embed_dim": family.ofs_embed_dim,
        "text_max_length": family.text_max_length,
    }
    print(json.dumps(summary, indent=2))
    return 0


def families(_: argparse.Namespace) -> int:
    from cogvx_dist.core.families import FAMILIES

    for family in FAMILIES.values():
        kind = "image-to-video" if family.image_to_video else "text-to-video"
        print(f"{family.name:22s} {kind:15s} {family.default_frames} frames {family.default_height}x"
              f"{family.default_width} @ {family.fps} fps  ({family.hub_id})")
    return 0
