"""Checkpoint folders: naming, the commit marker, `resume: auto`, and keeping the last K.

A checkpoint folder `checkpoints/step-00000100/` counts only once its commit marker exists; rank 0 writes the
marker last, after every rank has finished writing its part. A crash mid-save therefore leaves a folder without a
marker, which resume ignores and the next prune removes.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import write_atomic

COMMIT_MARKER = "COMMITTED.json"
LORA_SUBDIR = "lora"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_root(output_dir: str | Path) -> Path:
    """Folder holding a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after optimizer step `step`."""
    return checkpoints_root(output_dir) / f"step-{step:08d}"


def _step_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint, oldest first."""
    return [(step, path) for step, path in _step_folders(output_dir) if (path / COMMIT_MARKER).is_file()]


def find_resume_point(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one for "auto", none for "none", else the given folder."""
    if resume == "none":
        return None
    if resume == "auto":
        complete = complete_checkpoints(output_dir)
        return complete[-1][1] if complete else None
    path = Path(resume)
    if not (path / COMMIT_MARKER).is_file():
        raise CogvxError(f"checkpoint.resume: {path} is not a complete checkpoint (no {COMMIT_MARKER})")
    return path


def commit(folder: Path, info: dict[str, Any]) -> None:
    """Mark a checkpoint complete (rank 0, after all ranks finished writing)."""
    write_atomic(folder / COMMIT_MARKER, json.dumps({**info, "committed_at": time.time()}, indent=2) + "\n")


def read_commit(folder: Path) -> dict[str, Any]:
    """The commit marker's content."""
    return json.loads((folder / COMMIT_MARKER).read_text())


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones older than the newest."""
    complete = complete_checkpoints(output_dir)
    newest = complete[-1][0] if complete else -1
    keep = {path for _, path in complete[-keep_last:]}
    removed = []
    for step, path in _step_folders(output_dir):
        stale_incomplete = not (path / COMMIT_MARKER).is_file() and step < newest
        if (path not in keep and (path / COMMIT_MARKER).is_file()) or stale_incomplete:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


MASTER_WEIGHTS_FILE = "master_weights.safetensors"


def write_master_weights(folder: Path, tensors: dict, info: dict[str, Any]) -> Path:
    """World-size-independent fp32 adapter weights (safetensors, metadata as JSON strings), for elastic resume."""
    from safetensors.torch import save_file

    path = folder / MASTER_WEIGHTS_FILE
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in info.items()})
    return path


def read_master_weights(folder: Path) -> tuple[dict, dict[str, Any]]:
    """What `write_master_weights` wrote."""
    from safetensors import safe_open

    path = folder / MASTER_WEIGHTS_FILE
    if not path.is_file():
        raise CogvxError(f"{folder} has no {MASTER_WEIGHTS_FILE}; it can only resume with its original world size")
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        info = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    return tensors, info
