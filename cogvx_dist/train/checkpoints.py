"""Checkpoint folders: the commit marker, `resume: auto`, keeping the last K, and the world-size-free copies.

A checkpoint folder (core/run_folder.py names it) counts only once its commit marker exists; rank 0 writes the
marker last, after every rank has finished writing its part, and records in it every file's size (and the sha256
of the small ones). A crash mid-save leaves a folder without a marker, which resume ignores and the next prune
removes; a committed folder whose files no longer match the marker is passed over by `resume: auto` with a
warning naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import current_umask, write_atomic
from cogvx_dist.core.run_folder import ADAM_MOMENTS, COMMIT_MARKER, MASTER_WEIGHTS, RunFolder, is_committed

HASHED_BELOW = 64 << 20
"""Files smaller than this get a sha256 in the commit marker (adapters, weight copies); larger ones a size."""


def find_resume_point(output_dir: str | Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from and warnings about newer ones passed over: for "auto" the newest committed
    checkpoint whose files match its marker, for "none" none, else the given folder (which must match)."""
    if resume == "none":
        return None, []
    if resume != "auto":
        path = Path(resume)
        if not is_committed(path):
            raise CogvxError(f"checkpoint.resume: {path} is not a complete checkpoint (no {COMMIT_MARKER})")
        problems = verify(path)
        if problems:
            raise CogvxError(f"checkpoint.resume: {path} is damaged: {problems[0]}")
        return path, []
    warnings = []
    for step, path in reversed(RunFolder(output_dir).complete_checkpoints()):
        problems = verify(path)
        if not problems:
            return path, warnings
        warnings.append(f"checkpoint step {step} ({path}) is damaged and passed over: {'; '.join(problems[:3])}")
    return None, warnings


def file_record(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint folder (but the marker): its size, and the sha256 of the small ones."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMMIT_MARKER):
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if entry["bytes"] < HASHED_BELOW:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        files[str(path.relative_to(folder))] = entry
    return files


def verify(folder: Path) -> list[str]:
    """What no longer matches the commit marker's file record (empty for markers written before it existed)."""
    try:
        recorded = read_commit(folder).get("files")
    except (OSError, ValueError) as err:
        return [f"{COMMIT_MARKER} unreadable ({err})"]
    problems = []
    for name, entry in (recorded or {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} is {path.stat().st_size} bytes, the marker says {entry['bytes']}")
        elif "sha256" in entry and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(f"{name} differs from its sha256 in the marker")
    return problems


def commit(folder: Path, info: dict[str, Any]) -> None:
    """Mark a checkpoint complete (rank 0, after all ranks finished writing), recording every file."""
    record = {**info, "committed_at": time.time(), "files": file_record(folder)}
    write_atomic(folder / COMMIT_MARKER, json.dumps(record, indent=2) + "\n")


def read_commit(folder: Path) -> dict[str, Any]:
    """The commit marker's content."""
    return json.loads((folder / COMMIT_MARKER).read_text())


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones older than the newest."""
    run = RunFolder(output_dir)
    complete = run.complete_checkpoints()
    newest = complete[-1][0] if complete else -1
    keep = {path for _, path in complete[-keep_last:]}
    removed = []
    for step, path in run.step_folders():
        committed = is_committed(path)
        if (committed and path not in keep) or (not committed and step < newest):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_master_weights(folder: Path, tensors: dict, info: dict[str, Any]) -> Path:
    """World-size-independent fp32 adapter weights (safetensors, metadata as JSON strings), for elastic resume."""
    from safetensors.torch import save_file

    path = folder / MASTER_WEIGHTS
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in info.items()})
    follow_umask(path)
    return path


def write_adam_moments(folder: Path, moments: dict[str, Any], optimizer_step: int) -> Path:
    """Whole fp32 Adam moments (`exp_avg/NAME`, `exp_avg_sq/NAME`) and the optimizer's step count."""
    from safetensors.torch import save_file

    path = folder / ADAM_MOMENTS
    save_file(moments, str(path), metadata={"optimizer_step": str(optimizer_step)})
    follow_umask(path)
    return path


def follow_umask(path: Path) -> None:
    """Give a file the mode a plain open() would (0666 less the umask): safetensors writes 0600 whatever the umask,
    so a watcher or a resume under another user of a shared run folder could not read the copies."""
    path.chmod(0o666 & ~current_umask())


def read_adam_moments(folder: Path) -> tuple[dict, int] | None:
    """What `write_adam_moments` wrote, or None for checkpoints saved before moments were kept."""
    from safetensors import safe_open

    path = folder / ADAM_MOMENTS
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        moments = {key: handle.get_tensor(key) for key in handle.keys()}
        step = int((handle.metadata() or {}).get("optimizer_step", "0"))
    return moments, step


def read_master_weights(folder: Path) -> tuple[dict, dict[str, Any]]:
    """What `write_master_weights` wrote."""
    from safetensors import safe_open

    path = folder / MASTER_WEIGHTS
    if not path.is_file():
        raise CogvxError(f"{folder} has no {MASTER_WEIGHTS}; it can only resume with its original world size")
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        info = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    return tensors, info
