"""How a process of this project starts and ends: the garbage collector paused through start-up, and exits that
skip what could wait on a peer or cost seconds for nothing."""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn


def defer_garbage_collection() -> None:
    """Pause the cyclic garbage collector for a process's start-up. Importing torch, DeepSpeed, transformers, PEFT
    and diffusers creates millions of objects that live as long as the process, and CPython's collector walks them
    all again and again during the imports for nothing (a sizeable share of a training rank's import time on a small
    node). `resume_garbage_collection` ends the pause once set-up is done."""
    gc.disable()


def resume_garbage_collection() -> None:
    """End of start-up: what exists now lives until the process ends, so it leaves the collector's sight (gc.freeze:
    later collections walk only what the run allocates) and collection resumes. A no-op where start-up did not
    pause it (a caller that runs the trainer in its own process keeps its own collector). What set-up left as
    garbage is frozen with the rest rather than collected first: in a training rank that is a small share of small
    objects (tuples, cells, functions, a few frames; no tensor), while collecting them would walk everything."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def exit_finished(code: int) -> NoReturn:
    """End a process whose work is done, skipping the interpreter's teardown: with torch, DeepSpeed and diffusers
    loaded, freeing their module state costs up to seconds of CPU per process while the launcher or the shell waits.
    Every file is closed by now; this flushes stdio, shuts logging down and finalizes MPI where it was initialized,
    as their exit hooks would (a launcher may count a rank that skips MPI_Finalize as failed).
    Only for success paths: MPI_Finalize waits for peers, which a failing rank must not."""
    import logging
    import sys

    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    leave_now(code)


def leave_now(code: int) -> NoReturn:
    """Exit at once with `code`, stdio flushed: no clean-up that could wait on a peer (process-group teardown,
    loader workers)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class ProcessStat:
    """What /proc/PID/stat says of a process."""

    state: str
    """One letter: R running, S sleeping, D disk wait, T stopped, Z zombie (ended, not yet reaped), X dead."""
    start_ticks: int
    """When it started, in clock ticks since boot: with the pid, it names one process for the host's uptime (a pid
    reused later has another start time)."""
    wait_status: int
    """Its wait status once it ended (a zombie), as waitpid gives it to the parent; 0 while it runs."""

    @property
    def ended(self) -> bool:
        return self.state in "ZX"


def process_stat(pid: int) -> ProcessStat | None:
    """The process `pid` of this host as /proc shows it, or None where no process has that pid (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    except (OSError, IndexError):
        return None
    # Fields 3 (state), 22 (starttime) and 52 (exit_code, Linux 3.5+), counted from 1 with pid and name first.
    return ProcessStat(fields[0], int(fields[19]), int(fields[49]) if len(fields) > 49 else 0)


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True while `pid` names a live process of this host (not a zombie) that, with `start_ticks`, started then."""
    stat = process_stat(pid)
    return stat is not None and not stat.ended and (start_ticks is None or stat.start_ticks == start_ticks)


def describe_wait_status(status: int) -> str:
    """How a process ended, from its wait status: 'killed by SIGKILL' or 'exited with code N'."""
    if status & 0x7F:
        try:
            name = signal.Signals(status & 0x7F).name
        except ValueError:
            name = f"signal {status & 0x7F}"
        return f"killed by {name}"
    return f"exited with code {status >> 8}"


def signal_in_exit_code(code: int) -> str | None:
    """The signal a launcher's exit code reports, or None: DeepSpeed's per-node launcher exits with its rank's
    return code, which is -N for a rank killed by signal N, i.e. exit status 256 - N."""
    if not 256 - 64 <= code <= 255:
        return None
    try:
        return signal.Signals(256 - code).name
    except ValueError:
        return None


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` that has the kernel send `signum` to the child when the thread that
    forked it ends (PR_SET_PDEATHSIG), or None where there is no such call (not Linux). The kernel watches the
    forking THREAD, not the process: call Popen from a thread that lives as long as the parent does (the main
    thread). Everything is looked up here, in the parent: between fork and exec the child may take no lock (an
    import could wait forever on one another thread of the parent held). A parent that died before the call is
    caught by comparing the parent pid afterwards."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent, number = os.getpid(), int(signum)

    def arm() -> None:
        prctl(1, number, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), number)

    return arm
