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
from cogvx_dist.core.launch_env import env_rank
from cogvx_dist.core.process import defer_garbage_collection, exit_finished, leave_now


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
        end_rank(failures.EXIT_PREEMPTED)
    except CogvxError as err:
        # Most checks come out the same on every rank, so one line from rank 0 tells the whole story; a RankError
        # (a bad sample, a checkpoint one node cannot read) may not, and carries the rank.
        said = (f"cogvx train [rank {rank}]: error: {err}" if isinstance(err, RankError)
                else f"cogvx train: error: {err}" if rank == 0 else None)
        end_rank(failures.EXIT_USER_ERROR, said, trace=os.environ.get("COGVX_DEBUG", "") not in ("", "0"),
                 record=(output_dir, rank, str(err), failures.PRIMARY, ""))
    except BaseException as err:  # a bug, or a peer that vanished: say which, then go
        secondary = failures.is_peer_loss(err)
        line = f"{type(err).__name__}: {first_line(err)}"
        said = (f"cogvx train [rank {rank}]: stopped: a peer rank is gone ({line})" if secondary
                else f"cogvx train [rank {rank}]: failed: {line}")
        end_rank(failures.EXIT_FAILED, said, trace=not secondary,
                 record=(output_dir, rank, line, failures.SECONDARY if secondary else failures.PRIMARY,
                         traceback.format_exc()))
    return 0


def end_rank(code: int, said: str | None = None, trace: bool = False,
             record: tuple[str | None, int, str, str, str] | None = None) -> None:
    """Leave at once with `code`: claim the rank's end (or wait, if a watchdog thread is already ending it), print
    `said` (and the traceback), and record (output_dir, rank, message, kind, detail) when the config got that far:
    in output_dir/failures/ once this run holds the folder, or while no other live run does; else only on this host
    (the holder's ranks read failures/ and would take the record for one of their own)."""
    from cogvx_dist.train import failures
    from cogvx_dist.train.run_lock import held_by_another

    failures.claim_rank_end()
    if said:
        print(said, file=sys.stderr)
    if trace:
        traceback.print_exc()
    if record is not None and record[0]:
        output_dir, rank, message, kind, detail = record
        shared = failures.run_folder_held() or not held_by_another(output_dir)
        failures.record_failure(output_dir, rank, message, code, kind, detail, in_run_folder=shared)
    leave_now(code)


if __name__ == "__main__":
    defer_garbage_collection()  # through the imports and set-up; the trainer resumes it before its first step
    exit_finished(main())
