"""How a process of this project starts and ends: the garbage collector paused through start-up, and exits that
skip what could wait on a peer or cost seconds for nothing."""

from __future__ import annotations

import gc
import os
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
