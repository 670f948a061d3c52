"""Console logging: one format for every process of a job, the rank in every line that is not rank 0's, and the
libraries kept quiet."""

from __future__ import annotations

import logging
import warnings


def rank_logger(name: str, rank: int, every_rank: bool = False) -> logging.Logger:
    """Logger `name` for this process: rank 0 logs progress; other ranks only warnings unless `every_rank` (prep ranks
    each report their own slice). Lines of ranks other than 0 carry the rank, so interleaved logs stay readable."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    for handler in logger.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s cogvx {prefix}%(message)s", "%H:%M:%S"))
    logger.setLevel(logging.INFO if rank == 0 or every_rank else logging.WARNING)
    return logger


def quiet_libraries() -> None:
    """Keep the console to our own lines: no per-component progress bars or deprecation chatter."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass
