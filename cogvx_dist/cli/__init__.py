"""The `cogvx` command line: one console script with subcommands.

Subcommands import their modules lazily, so `cogvx --help` and config errors come back fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from cogvx_dist.core.errors import CogvxError


def _make_tiny_model(args: argparse.Namespace) -> int:
    from cogvx_dist.core.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, args.family, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {args.family} checkpoint (seed {args.seed}) to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cogvx_dist.core.loading import describe_checkpoint

    info = describe_checkpoint(args.model)
    family = info.family
    summary = {
        "source": info.source,
        "family": family.name,
        "pipeline": family.pipeline_class,
        "frames": info.frames,
        "height": info.height,
        "width": info.width,
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


def _families(_: argparse.Namespace) -> int:
    from cogvx_dist.core.families import FAMILIES

    for family in FAMILIES.values():
        kind = "image-to-video" if family.image_to_video else "text-to-video"
        print(
            f"{family.name:22s} {kind:15s} {family.default_frames} frames {family.default_height}x"
            f"{family.default_width} @ {family.fps} fps  ({family.hub_id})"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from cogvx_dist.core.families import FAMILIES

    parser = argparse.ArgumentParser(prog="cogvx", description="Distributed LoRA fine-tuning for CogVideoX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    tiny = command("make-tiny-model", _make_tiny_model, "write a tiny random-weight CogVideoX checkpoint")
    tiny.add_argument("out", help="output folder (diffusers layout)")
    tiny.add_argument("--family", default="CogVideoX-2b", choices=list(FAMILIES), help="model family")
    tiny.add_argument("--seed", type=int, default=0, help="seed for all random weights and the tokenizer")
    tiny.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")

    info = command("info", _info, "detect a checkpoint's family and print what the family table says of it")
    info.add_argument("model", help="diffusers-format folder or hub id")

    command("families", _families, "list the supported CogVideoX families")

    # Each tier registers its own subcommands (lazily importing its heavy modules in the handlers).
    from cogvx_dist.launch import register as register_launch
    from cogvx_dist.cli.results import register as register_results
    from cogvx_dist.cli.train import register as register_train
    from cogvx_dist.cli.prep import register as register_prep

    register_prep(command)
    register_train(command)
    register_launch(command)
    register_results(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cogvx` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except CogvxError as err:
        print(f"cogvx {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cogvx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
