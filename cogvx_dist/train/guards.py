"""What ends a rank other than finishing: the run lock, the preemption signals, the stall and peer-failure watchdog,
the loss of `cogvx train` or of the rank's launcher (train/supervision.py) and stack dumps on SIGUSR2, started
together before a run and stopped together after it.

The watchdog and the preemption deadline run in threads; whichever ends the rank first records why
(output_dir/failures/), says it with the rank, and leaves at once with the exit code that names the cause
(train/failures.py lists them). A signal agreed at a step boundary ends the run through `stop_preempted` instead,
after the checkpoint of that step is committed; so does a lost supervisor, which raises the same flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cogvx_dist.core.faults import delay_hook
from cogvx_dist.core.launch_env import RankInfo
from cogvx_dist.core.logs import rank_logger
from cogvx_dist.core.run_folder import RunFolder
from cogvx_dist.train import engine, failures, supervision
from cogvx_dist.train.config import RunConfig
from cogvx_dist.train.preemption import PreemptionFlag, exit_now
from cogvx_dist.train.run_lock import RunLock
from cogvx_dist.train.watchdog import Watchdog, register_stack_dump


class RunGuards:
    """The guards of one rank's run; `with RunGuards(...) as guards:` holds them for the run's length."""

    def __init__(self, config: RunConfig, ranks: RankInfo) -> None:
        self.config = config
        self.ranks = ranks
        self.run = RunFolder(config.output_dir)
        self.log = rank_logger("cogvx.train", ranks.rank)
        self.lock = RunLock(config.output_dir)
        self.preemption = PreemptionFlag(config.checkpoint.preempt_signals, config.checkpoint.preempt_grace_s,
                                         self._preempt_deadline)
        self.watchdog = Watchdog(self.run.root, ranks.rank, ranks.world_size, config.distributed.stall_timeout_s,
                                 self._stalled, self._peer_failed, tick=self.lock.refresh,
                                 network_floor_s=config.distributed.network_stall_floor_s,
                                 network_factor=config.distributed.network_stall_factor)
        self.supervision = supervision.Supervision(self._supervisor_lost)
        self.slow_preemption_record = delay_hook("train.preemption_record_delay_ms")

    def __enter__(self) -> RunGuards:
        """Take the run lock (rank 0), clear this rank's old failure record, register stack dumps and start the
        watchdog and the supervision."""
        try:
            if self.ranks.is_main:
                self.lock.acquire()
            # No rank touches the folder (failure records, heartbeats, stacks) before rank 0 holds its lock: when
            # another run holds it, rank 0 leaves and the launcher ends the ones waiting here.
            engine.barrier()
            failures.hold_run_folder()
            failures.clear_failures(self.run.root, self.ranks.rank)
            supervision.clear_note(self.run.root, self.ranks.rank)
            register_stack_dump(self.run.root, self.ranks.rank)
            self.watchdog.start()
            self.supervision.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.preemption.cancel()
        self.watchdog.stop()
        self.supervision.stop()
        self.lock.release()

    def progress(self, step: int) -> None:
        """A step (or checkpoint) completed: the watchdog's clock starts again."""
        self.watchdog.progress(step)

    def stop_preempted(self, step: int) -> None:
        """Every rank agreed on a preemption and the checkpoint of `step` is committed: record it and end the run."""
        cause = self._preemption_cause()
        if self.ranks.is_main:
            if self.slow_preemption_record:
                self.slow_preemption_record()
            failures.record_preemption(self.run.root, step, cause)
        # No rank leaves before the record exists: another node's `cogvx train` reads it as soon as that node's
        # ranks are gone, and would otherwise report a launcher that died of the signal with no reason.
        engine.barrier()
        self.log.info("preempted by %s: checkpoint of step %d committed; rerun the same command to resume",
                      cause, step)
        raise failures.Preempted(step, cause)

    def _preemption_cause(self) -> str:
        """What asked the job to stop: this rank's own signal or lost supervisor, else a peer's lost supervisor from
        its note (written before that peer raised its flag, so before the agreement that brought this rank here),
        else what the agreement said."""
        name = self.preemption.signal_name
        if name.startswith("SIG") or self.supervision.lost:
            return name
        notes = supervision.read_notes(self.run.root, since=self.supervision.since)
        if notes:
            return f"the loss of {notes[0]['lost']}"
        return name

    def _supervisor_lost(self, what: str) -> None:
        """From the supervision thread: nobody would report this job's end or end it on a failure, so it stops as on
        a preemption signal, at the next step boundary with a committed checkpoint."""
        self.log.error("%s is gone: committing a checkpoint at the next step boundary and stopping (exit %d); rerun "
                       "the same command to resume", what, failures.EXIT_PREEMPTED)
        supervision.write_note(self.run.root, self.ranks.rank, what)
        self.preemption.request(f"the loss of {what}")

    def _preempt_deadline(self, signal_name: str) -> None:
        message = (f"preempted by {signal_name}, but no checkpoint committed within checkpoint.preempt_grace_s "
                   f"{self.config.checkpoint.preempt_grace_s:g}; resume takes the last committed one")
        self._die(message, failures.EXIT_PREEMPT_UNSAVED)

    def _stalled(self, message: str, kill_lagging: Callable[[], None]) -> None:
        self._die(message, failures.EXIT_STALLED, before_exit=kill_lagging)

    def _peer_failed(self, record: dict[str, Any]) -> None:
        self._die(f"stopped: rank {record.get('rank')} failed ({record.get('message', '')[:200]})",
                  failures.EXIT_FAILED, failures.SECONDARY)

    def _die(self, message: str, code: int, kind: str = failures.PRIMARY,
             before_exit: Callable[[], None] | None = None) -> None:
        """From a watchdog or timer thread: record why, say it, and leave at once."""
        failures.claim_rank_end()
        failures.record_failure(self.run.root, self.ranks.rank, message, code, kind)
        self.log.error("%s%s", "[rank 0] " if self.ranks.rank == 0 else "", message)  # others: their prefix
        if before_exit is not None:
            before_exit()
        self.lock.release()
        exit_now(code)
