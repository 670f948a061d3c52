"""Files that other processes read: written whole (temporary sibling, flush, rename) and with the modes a plain
`open()` or `mkdir` would give them (0666/0777 less the umask), so that a watcher or a pod running as another
user on a shared volume can read them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError, first_line


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` atomically (readers see the old file or the whole new one, even across a crash)."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    # A unique temporary name per writer: several processes may write the same file (e.g. a merged manifest).
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def make_temporary_folder(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in `parent` with the mode `mkdir` would give it (mkdtemp makes 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def sorted_safetensors_header(blob: bytes, extra_metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with its JSON header written with sorted keys (plus `extra_metadata`). The
    writer keeps metadata in a hash map whose order changes from process to process; sorted, the same tensors and
    metadata always give the same bytes. The tensor data and its offsets stay as they are."""
    import json
    import struct

    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    if extra_metadata:
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra_metadata}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data that follows to 8 bytes
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def read_json_object(path: str | Path, what: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object (a config, an index), or a one-line error naming the file (and `what`
    it is, when its name alone does not say)."""
    where = f"{what} {path}" if what else str(path)
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise CogvxError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from err
    except UnicodeDecodeError as err:
        raise CogvxError(f"{where}: not a text file ({err.reason})") from err
    if not isinstance(data, dict):
        raise CogvxError(f"{where}: holds a JSON {type(data).__name__}, not an object of settings")
    return data


FULL_BELOW = 16 << 20
"""Free bytes under which a failed write is put down to a full disk."""


def _existing(path: Path) -> Path:
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def disk_is_full(path: str | Path) -> bool:
    """True when the filesystem holding `path` has almost no space left."""
    import shutil

    return shutil.disk_usage(_existing(Path(path))).free < FULL_BELOW


def describe_io_error(err: Exception, path: str | Path) -> str:
    """A failed write with the path and, when the disk is the problem, the space left there."""
    import errno
    import shutil

    where = _existing(Path(path))
    free = shutil.disk_usage(where).free
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < FULL_BELOW
    cause = "the disk is full" if full else (getattr(err, "strerror", None) or first_line(err))
    return f"{cause} writing {getattr(err, 'filename', None) or path} ({free / 2**20:.1f} MiB free on {where})"
