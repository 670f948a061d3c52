"""Writing files so that a reader never sees half of one: write a temporary sibling, flush to disk, rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` atomically (readers see the old file or the whole new one, even across a crash)."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    # A unique temporary name per writer: several processes may write the same file (e.g. a merged manifest).
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
