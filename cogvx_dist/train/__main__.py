"""Per-rank entry point of a training job.

    deepspeed [launcher args] --module cogvx_dist.train --config run.yaml [section.key=value ...]

However a rank ends, it ends at once: a failing rank prints its one line (with its rank), leaves a record in
output_dir/failures/ and exits without waiting on any peer, so the launcher ends the others within seconds.
Exit codes are listed in cogvx_dist/train/failures.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from cogvx_dist.core.errors import CogvxError, RankError, first_line
from cogvx_dist.core.launch_env import defer_garbage_collection, env_rank, exit_finished, leave_now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvx_dist.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config file (YAML or TOML)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = env_rank()
    output_dir = None
    # DeepSpeed's ZeRO calls torch's deprecated all-gather name: a warning on every rank that no user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    from cogvx_dist.train import failures

    try:
        from cogvx_dist.core.config_files import load_config
        from cogvx_dist.train.config import RunConfig
        from cogvx_dist.train.loop import train

        config = load_config(RunConfig, args.config, args.overrides)
        output_dir = config.output_dir
        train(config)
    except failures.Preempted:
        failures.claim_rank_end()  # or wait, if a watchdog thread is already ending this rank
        leave_now(failures.EXIT_PREEMPTED)
    except CogvxError as err:
        failures.claim_rank_end()  # or wait, if a watchdog thread is already ending this rank
        # Most checks come out the same on every rank, so one line from rank 0 tells the whole story; a RankError
        # (a bad sample, a checkpoint one node cannot read) may not, and carries the rank.
        if isinstance(err, RankError):
            print(f"cogvx train [rank {rank}]: error: {err}", file=sys.stderr)
        elif rank == 0:
            print(f"cogvx train: error: {err}", file=sys.stderr)
        if os.environ.get("COGVX_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        if output_dir:
            failures.record_failure(output_dir, rank, str(err), failures.EXIT_USER_ERROR)
        leave_now(failures.EXIT_USER_ERROR)
    except BaseException as err:  # a bug, or a peer that vanished: say which, then go
        failures.claim_rank_end()  # or wait, if a watchdog thread is already ending this rank
        secondary = failures.is_peer_loss(err)
        line = f"{type(err).__name__}: {first_line(err)}"
        if secondary:
            print(f"cogvx train [rank {rank}]: stopped: a peer rank is gone ({line})", file=sys.stderr)
        else:
            print(f"cogvx train [rank {rank}]: failed: {line}", file=sys.stderr)
            traceback.print_exc()
        if output_dir:
            failures.record_failure(output_dir, rank, line, failures.EXIT_FAILED,
                                    failures.SECONDARY if secondary else failures.PRIMARY, traceback.format_exc())
        leave_now(failures.EXIT_FAILED)
    return 0


if __name__ == "__main__":
    defer_garbage_collection()  # through the imports and set-up; the trainer resumes it before its first step
    exit_finished(main())
