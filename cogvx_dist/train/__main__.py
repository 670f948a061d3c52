"""Per-rank entry point of a training job.

    deepspeed [launcher args] --module cogvx_dist.train --config run.yaml [section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys

from cogvx_dist.core.errors import CogvxError, RankError
from cogvx_dist.core.launch_env import env_rank


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvx_dist.train", description=__doc__)
    parser.add_argument("--config", help="run config file (YAML or TOML)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = env_rank()
    try:
        from cogvx_dist.core.config_files import load_config
        from cogvx_dist.train.config import RunConfig
        from cogvx_dist.train.loop import train

        train(load_config(RunConfig, args.config, args.overrides))
    except CogvxError as err:
        # Most checks come out the same on every rank, so one line from rank 0 tells the whole story; a RankError
        # (e.g. adapters that differ, a checkpoint one node cannot read) may not, and carries the rank.
        if isinstance(err, RankError):
            print(f"cogvx train [rank {rank}]: error: {err}", file=sys.stderr)
        elif rank == 0:
            print(f"cogvx train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
