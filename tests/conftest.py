"""Shared fixtures: tiny checkpoints are made once per test session and per family."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_checkpoint(family, seed=0) -> Path of a tiny diffusers checkpoint (cached per session)."""
    from cogvx_dist.core.tiny import make_tiny_checkpoint

    made: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def make(family: str = "CogVideoX-2b", seed: int = 0) -> Path:
        key = (family, seed)
        if key not in made:
            made[key] = make_tiny_checkpoint(root / f"{family}-{seed}", family, seed=seed)
        return made[key]

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m cogvx_dist ARGS` in a fresh process, capturing text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cogvx_dist", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
