"""Checkpoint folders: the commit marker, `resume: auto`, keeping the last K, and the world-size-free weight copy.

A checkpoint folder (core/run_folder.py names it) counts only once its commit marker exists; rank 0 writes the
marker last, after every rank has finished writing its part. A crash mid-save therefore leaves a folder without a
marker, which resume ignores and the next prune removes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from cogvx_dist.core.errors import CogvxError
from cogvx_dist.core.files import write_atomic
from cogvx_dist.core.run_folder import COMMIT_MARKER, MASTER_WEIGHTS, RunFolder, is_committed


def find_resume_point(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one for "auto", none for "none", else the given folder."""
    if resume == "none":
        return None
    if resume == "auto":
        complete = RunFolder(output_dir).complete_checkpoints()
        return complete[-1][1] if complete else None
    path = Path(resume)
    if not is_committed(path):
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
    return path


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
