"""Per-rank entry point: `deepspeed [launcher args] -m cogvx_dist.train --config run.yaml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from cogvx_dist.errors import CogvxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvx_dist.train", description=__doc__)
    parser.add_argument("--config", help="run config file (YAML or TOML)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))))
    try:
        from cogvx_dist.config import load_config
        from cogvx_dist.train.config import RunConfig
        from cogvx_dist.train.loop import train

        train(load_config(RunConfig, args.config, args.overrides))
    except CogvxError as err:
        # Pre-flight checks are identical on every rank, so one line from rank 0 tells the whole story; errors
        # raised once ranks run (e.g. adapters that differ) can be rank-specific and carry the rank.
        if getattr(err, "rank_specific", False):
            print(f"cogvx train [rank {rank}]: error: {err}", file=sys.stderr)
        elif rank == 0:
            print(f"cogvx train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
